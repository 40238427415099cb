// The save planner's fast path over Python lists (tensorfile/_plan.py): per-tensor lists
// of torch metadata in, the tensor table's columns and the storages (plan.hpp) out.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

namespace tensorfile::python {

// One list per attribute, one item per tensor. Returns (dtype, dim_begin, ndim, shapes,
// strides, offset, flags, storage, lead, ptrs, nbytes) as arrays, or None when an item
// is not what a dense torch tensor gives, so that the caller describes each tensor.
// `storage_ptr(i)` is called for the empty tensors only, whose data pointer may be null.
pybind11::object plan_tensors(const pybind11::list& sizes, const pybind11::list& strides,
                              const pybind11::list& data_ptrs, const pybind11::list& storage_offsets,
                              const pybind11::list& requires_grad, const pybind11::list& dtypes,
                              const pybind11::dict& dtype_codes, const std::vector<int64_t>& itemsizes,
                              const pybind11::list& types, const pybind11::handle& flagged_type, int64_t type_flag,
                              int64_t grad_flag, const pybind11::function& storage_ptr, int64_t align);

}  // namespace tensorfile::python
