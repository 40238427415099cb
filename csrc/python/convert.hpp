// Conversions between Python arguments and the engine's types, for bindings.cpp: numpy
// arrays of addresses, byte counts and offsets to regions, vectors back to arrays, and
// the option structs built from keyword arguments.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "engine.hpp"
#include "regions.hpp"
#include "staging.hpp"
#include "xxh3.hpp"

namespace tensorfile::python {

namespace py = pybind11;

// Arrays are taken C-contiguous, converting other dtypes and layouts (a copy).
constexpr int kIn = py::array::c_style | py::array::forcecast;
using U64Array = py::array_t<uint64_t, kIn>;

// One region per entry of three 1-d arrays of one length; std::invalid_argument
// otherwise. Without file_offsets, every file_offset is 0 (regions of memory alone).
std::vector<Region> to_regions(const U64Array& ptrs, const U64Array& nbytes, const U64Array& file_offsets);
std::vector<Region> to_regions(const U64Array& ptrs, const U64Array& nbytes);
std::vector<ZeroRange> to_zero_ranges(const U64Array& file_offsets, const U64Array& nbytes);

template <typename T>
py::array_t<T> to_array(const std::vector<T>& v) {
  py::array_t<T> out(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::memcpy(out.mutable_data(), v.data(), v.size() * sizeof(T));
  return out;
}

TransferOptions transfer_options(size_t num_threads, size_t task_nbytes, bool checksum, bool zip_crc = false,
                                 bool hugepages = false, bool writeback = false);
StagingOptions staging_options(size_t num_threads, size_t staging_nbytes, size_t staging_buffers, bool checksum,
                               int gds_fd, bool zip_crc = false);

// A checksum of the bytes of a contiguous buffer object (BufferError for any other),
// continuing from `crc`; the GIL is released while it runs.
uint32_t buffer_checksum(const py::object& data, uint32_t crc, uint32_t (*fn)(const void*, size_t, uint32_t) noexcept);

// The XXH3-128 digest (16 bytes) of a contiguous buffer object's bytes (BufferError for
// any other); the GIL is released while a large input is hashed.
py::bytes buffer_xxh3_128(const py::object& data, Xxh3Kernel kernel = Xxh3Kernel::kAuto);
// A sequence of such buffers through one Xxh3State: the digest after each part's update,
// so entry i is the digest of parts[0..i] concatenated. Without the GIL while it hashes.
py::list buffer_xxh3_128_parts(const py::sequence& parts, Xxh3Kernel kernel);

// Digests as a list of 16-byte bytes objects, in order.
py::list to_bytes_list(const std::vector<Digest128>& digests);

}  // namespace tensorfile::python
