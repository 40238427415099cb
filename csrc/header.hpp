// The header's tensor and storage tables in native code: an encoder that writes them as
// the compact JSON of docs/format.md, and a fast decoder for headers as tensorfile
// writes them that applies every validation rule to the tables and to the common shapes
// of the object tree, producing flat tables instead of objects.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace tensorfile {

// One dtype the format knows: kind 0 is "torch", 1 is "numpy".
struct DtypeInfo {
  int kind;
  std::string name;
  uint64_t itemsize;
  bool grad_ok;  // may carry requires_grad
};

// The header's tables when the fast path accepted it. Offsets into the header bytes
// locate the object tree and the metadata object, which the caller decodes itself.
struct HeaderTables {
  size_t tree_begin = 0, tree_end = 0;
  size_t metadata_begin = 0, metadata_end = 0;
  std::vector<uint64_t> storage_offsets;  // relative to the data section
  std::vector<uint64_t> storage_nbytes;
  std::vector<uint32_t> storage_crcs;
  std::vector<int32_t> storage_device;  // index into devices
  std::vector<std::string> devices;     // distinct device strings, in order of appearance
  std::vector<int8_t> storage_kind;     // 0 torch, 1 numpy
  // Per tensor row: kind, storage, dtype (index into the DtypeInfo table), ndim, byte
  // offset, flags; shapes and strides of all rows concatenated in row order.
  std::vector<int64_t> tensors;  // 6 per row
  std::vector<int64_t> shapes;
  std::vector<int64_t> strides;
};

// The tensor table as columns: row i has kind[i] (0 torch, 1 numpy), storage[i],
// dtype_names[dtype[i]], ndim[i] dims at shapes/strides[dim_begin[i]...], offset[i]
// and flags[i].
struct TensorColumns {
  size_t count = 0;
  const int8_t* kind = nullptr;
  const int64_t* storage = nullptr;
  const int32_t* dtype = nullptr;
  const int64_t* dim_begin = nullptr;
  const int64_t* ndim = nullptr;
  const int64_t* offset = nullptr;
  const int64_t* flags = nullptr;
  const int64_t* shapes = nullptr;
  const int64_t* strides = nullptr;
  size_t dims = 0;  // entries in shapes and strides
};

// The JSON array of tensor rows, byte for byte what json.dumps writes with compact
// separators. Names must need no JSON escaping. Throws std::invalid_argument for an
// index outside the name table or the dims.
std::string encode_tensor_rows(const TensorColumns& t, const std::vector<std::string>& dtype_names);

// The JSON array of storage rows [offset, nbytes, device].
std::string encode_storage_rows(size_t count, const uint64_t* offsets, const uint64_t* nbytes, const int32_t* device,
                                const std::vector<std::string>& devices);

// Decodes header bytes. Returns false when the header is outside what the fast path
// handles (whitespace, string escapes, non-ASCII bytes, rare tree node types, deep
// nesting) or breaks any rule: the caller then runs the complete validator, which
// decides and words the error. Returns true only for headers that the complete
// validator accepts, with `out` filled. `header_nbytes` and `file_nbytes` come from the
// preamble. Pure: touches nothing but `out`; thread-safe.
bool decode_header(const char* data, size_t nbytes, uint64_t file_nbytes, const std::vector<DtypeInfo>& dtypes,
                   HeaderTables& out);

}  // namespace tensorfile
