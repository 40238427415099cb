// Argument and result conversions for the bindings (see convert.hpp).
#include "python/convert.hpp"

#include <memory>
#include <stdexcept>

namespace tensorfile::python {

namespace {

void check_columns(const std::vector<const U64Array*>& columns, const char* names) {
  for (const U64Array* c : columns) {
    if (c->ndim() != 1 || c->shape(0) != columns[0]->shape(0)) {
      throw std::invalid_argument(std::string(names) + " must be 1-d arrays of one length");
    }
  }
}

// A contiguous buffer held for the lifetime of the object. PyBUF_SIMPLE accepts only
// contiguous buffers (BufferError otherwise), so its bytes are exactly the object's.
class BufferView {
 public:
  explicit BufferView(const py::handle& data) {
    if (PyObject_GetBuffer(data.ptr(), &view_, PyBUF_SIMPLE) != 0) throw py::error_already_set();
  }
  ~BufferView() { PyBuffer_Release(&view_); }
  BufferView(const BufferView&) = delete;
  BufferView& operator=(const BufferView&) = delete;
  const void* data() const { return view_.buf; }
  size_t nbytes() const { return static_cast<size_t>(view_.len); }

 private:
  Py_buffer view_;
};

// Below this many bytes a hash takes less time than releasing and taking back the GIL.
constexpr size_t kReleaseGilFrom = size_t{64} << 10;

py::bytes to_bytes(const Digest128& d) { return py::bytes(reinterpret_cast<const char*>(d.data()), d.size()); }

}  // namespace

std::vector<Region> to_regions(const U64Array& ptrs, const U64Array& nbytes, const U64Array& file_offsets) {
  check_columns({&ptrs, &nbytes, &file_offsets}, "ptrs, nbytes and file_offsets");
  const auto n = static_cast<size_t>(ptrs.shape(0));
  std::vector<Region> regions(n);
  const uint64_t* p = ptrs.data();
  const uint64_t* b = nbytes.data();
  const uint64_t* o = file_offsets.data();
  for (size_t i = 0; i < n; i++) regions[i] = Region{static_cast<uintptr_t>(p[i]), b[i], o[i]};
  return regions;
}

std::vector<Region> to_regions(const U64Array& ptrs, const U64Array& nbytes) {
  check_columns({&ptrs, &nbytes}, "ptrs and nbytes");
  const auto n = static_cast<size_t>(ptrs.shape(0));
  std::vector<Region> regions(n);
  const uint64_t* p = ptrs.data();
  const uint64_t* b = nbytes.data();
  for (size_t i = 0; i < n; i++) regions[i] = Region{static_cast<uintptr_t>(p[i]), b[i], 0};
  return regions;
}

std::vector<ZeroRange> to_zero_ranges(const U64Array& file_offsets, const U64Array& nbytes) {
  check_columns({&file_offsets, &nbytes}, "zero_offsets and zero_nbytes");
  const auto n = static_cast<size_t>(file_offsets.shape(0));
  std::vector<ZeroRange> zeros(n);
  const uint64_t* o = file_offsets.data();
  const uint64_t* b = nbytes.data();
  for (size_t i = 0; i < n; i++) zeros[i] = ZeroRange{o[i], b[i]};
  return zeros;
}

TransferOptions transfer_options(size_t num_threads, size_t task_nbytes, bool checksum, bool zip_crc, bool hugepages,
                                 bool writeback) {
  TransferOptions o;
  o.num_threads = num_threads;
  o.task_nbytes = task_nbytes;
  o.checksum = checksum;
  o.zip_crc = zip_crc;
  o.hugepages = hugepages;
  o.writeback = writeback;
  return o;
}

StagingOptions staging_options(size_t num_threads, size_t staging_nbytes, size_t staging_buffers, bool checksum,
                               int gds_fd, bool zip_crc) {
  StagingOptions o;
  o.num_threads = num_threads;
  o.staging_nbytes = staging_nbytes;
  o.staging_buffers = staging_buffers;
  o.checksum = checksum;
  o.gds_fd = gds_fd;
  o.zip_crc = zip_crc;
  return o;
}

uint32_t buffer_checksum(const py::object& data, uint32_t crc, uint32_t (*fn)(const void*, size_t, uint32_t) noexcept) {
  // PyBUF_SIMPLE accepts only contiguous buffers (BufferError otherwise), so the bytes
  // checksummed are exactly the bytes of the object.
  Py_buffer view;
  if (PyObject_GetBuffer(data.ptr(), &view, PyBUF_SIMPLE) != 0) throw py::error_already_set();
  uint32_t out;
  {
    py::gil_scoped_release release;
    out = fn(view.buf, static_cast<size_t>(view.len), crc);
  }
  PyBuffer_Release(&view);
  return out;
}

py::bytes buffer_xxh3_128(const py::object& data, Xxh3Kernel kernel) {
  const BufferView view(data);
  Digest128 digest;
  if (view.nbytes() >= kReleaseGilFrom) {
    py::gil_scoped_release release;
    digest = xxh3_128(view.data(), view.nbytes(), kernel);
  } else {
    digest = xxh3_128(view.data(), view.nbytes(), kernel);
  }
  return to_bytes(digest);
}

py::list buffer_xxh3_128_parts(const py::sequence& parts, Xxh3Kernel kernel) {
  std::vector<std::unique_ptr<BufferView>> views;
  for (const py::handle part : parts) views.push_back(std::make_unique<BufferView>(part));
  Xxh3State state(kernel);
  std::vector<Digest128> digests(views.size());
  {
    py::gil_scoped_release release;
    for (size_t i = 0; i < views.size(); i++) {
      state.update(views[i]->data(), views[i]->nbytes());
      digests[i] = state.digest();
    }
  }
  return to_bytes_list(digests);
}

py::list to_bytes_list(const std::vector<Digest128>& digests) {
  py::list out(digests.size());
  for (size_t i = 0; i < digests.size(); i++) out[i] = to_bytes(digests[i]);
  return out;
}

}  // namespace tensorfile::python
