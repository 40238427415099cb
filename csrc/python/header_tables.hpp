// The header codec's Python faces (header.hpp): a decoded header's tables as numpy
// arrays, and the tensor and storage tables encoded from numpy columns.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "python/convert.hpp"

namespace tensorfile::python {

using DtypeRow = std::tuple<int, std::string, uint64_t, bool>;  // kind, name, itemsize, grad_ok

// (tree_begin, tree_end, metadata_begin, metadata_end, storage_offsets, storage_nbytes,
// storage_crcs, storage_device, devices, storage_kind, tensors (n x 6), shapes, strides)
// of a canonical header, or None where the full validator must decide. Runs without the GIL.
py::object decode_header_tables(const py::buffer& header, uint64_t file_nbytes, const std::vector<DtypeRow>& dtypes);

// (tensor rows, storage rows) as compact JSON arrays; std::invalid_argument when the
// columns' lengths differ. Runs without the GIL.
py::tuple encode_header_tables(const py::array_t<int8_t, kIn>& kind, const py::array_t<int64_t, kIn>& storage,
                               const py::array_t<int32_t, kIn>& dtype, const py::array_t<int64_t, kIn>& dim_begin,
                               const py::array_t<int64_t, kIn>& ndim, const py::array_t<int64_t, kIn>& offset,
                               const py::array_t<int64_t, kIn>& flags, const py::array_t<int64_t, kIn>& shapes,
                               const py::array_t<int64_t, kIn>& strides, const std::vector<std::string>& dtype_names,
                               const U64Array& storage_offsets, const U64Array& storage_nbytes,
                               const py::array_t<int32_t, kIn>& device, const std::vector<std::string>& devices);

}  // namespace tensorfile::python
