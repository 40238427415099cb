// The save planner's per-tensor arithmetic: from the metadata of many dense tensors (shape,
// stride, storage offset, data pointer), each tensor's byte span in its storage, the
// storages in order of first use, and the span of each that the tensors reference.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace tensorfile {

// Input, one entry per tensor; dims of all tensors concatenated in tensor order.
struct TensorSpans {
  std::vector<int64_t> ndim;
  std::vector<int64_t> shapes;
  std::vector<int64_t> strides;
  std::vector<int64_t> first;     // byte offset of element 0 in its storage
  std::vector<int64_t> end;       // the byte just past the last element; == first when empty
  std::vector<uint64_t> storage;  // the storage's address; 0: a storage without memory
};

// Output: storage[i] indexes the storages, in order of first use; offset[i] is the byte
// offset of tensor i in its storage's written span (0 for a tensor with no bytes in it).
// Per storage: lead (its first tensor), ptr (address of the span) and nbytes.
struct StorageGroups {
  std::vector<int64_t> storage;
  std::vector<int64_t> offset;
  std::vector<int64_t> lead;
  std::vector<uint64_t> ptrs;
  std::vector<uint64_t> nbytes;
};

// The byte just past tensor's last element given its first byte, item size and dims;
// returns false when that does not fit in int64 (no real tensor's span does not). `empty`
// is set when a dim is 0, and then `end` is `first`.
bool tensor_end(int64_t first, int64_t itemsize, const int64_t* shape, const int64_t* stride, int64_t ndim,
                int64_t* end, bool* empty);

// Groups tensors by storage address; storages with address 0 share nothing. The written
// span of a storage runs from the lowest first byte of its tensors with bytes, rounded down
// to `align`, to their highest end; a storage none of whose tensors has bytes gets an empty
// span at its start.
StorageGroups group_storages(const TensorSpans& t, int64_t align);

}  // namespace tensorfile
