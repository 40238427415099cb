// Conversions around the header codec (see header_tables.hpp).
#include "python/header_tables.hpp"

#include <cstring>
#include <stdexcept>

#include "header.hpp"

namespace tensorfile::python {

py::object decode_header_tables(const py::buffer& header, uint64_t file_nbytes, const std::vector<DtypeRow>& dtypes) {
  std::vector<DtypeInfo> table;
  for (const auto& [kind, name, itemsize, grad_ok] : dtypes) table.push_back(DtypeInfo{kind, name, itemsize, grad_ok});
  py::buffer_info info = header.request();
  HeaderTables t;
  bool accepted;
  {
    py::gil_scoped_release release;
    accepted = decode_header(static_cast<const char*>(info.ptr), static_cast<size_t>(info.size * info.itemsize),
                             file_nbytes, table, t);
  }
  if (!accepted) return py::none();
  py::array_t<int64_t> tensors({static_cast<py::ssize_t>(t.tensors.size() / 6), py::ssize_t{6}});
  if (!t.tensors.empty()) std::memcpy(tensors.mutable_data(), t.tensors.data(), t.tensors.size() * sizeof(int64_t));
  return py::make_tuple(t.tree_begin, t.tree_end, t.metadata_begin, t.metadata_end, to_array(t.storage_offsets),
                        to_array(t.storage_nbytes), to_array(t.storage_crcs), to_array(t.storage_device), t.devices,
                        to_array(t.storage_kind), tensors, to_array(t.shapes), to_array(t.strides));
}

py::tuple encode_header_tables(const py::array_t<int8_t, kIn>& kind, const py::array_t<int64_t, kIn>& storage,
                               const py::array_t<int32_t, kIn>& dtype, const py::array_t<int64_t, kIn>& dim_begin,
                               const py::array_t<int64_t, kIn>& ndim, const py::array_t<int64_t, kIn>& offset,
                               const py::array_t<int64_t, kIn>& flags, const py::array_t<int64_t, kIn>& shapes,
                               const py::array_t<int64_t, kIn>& strides, const std::vector<std::string>& dtype_names,
                               const U64Array& storage_offsets, const U64Array& storage_nbytes,
                               const py::array_t<int32_t, kIn>& device, const std::vector<std::string>& devices) {
  const auto n = static_cast<size_t>(kind.size());
  const auto k = static_cast<size_t>(storage_offsets.size());
  if (static_cast<size_t>(storage.size()) != n || static_cast<size_t>(dtype.size()) != n ||
      static_cast<size_t>(dim_begin.size()) != n || static_cast<size_t>(ndim.size()) != n ||
      static_cast<size_t>(offset.size()) != n || static_cast<size_t>(flags.size()) != n ||
      shapes.size() != strides.size() || static_cast<size_t>(storage_nbytes.size()) != k ||
      static_cast<size_t>(device.size()) != k) {
    throw std::invalid_argument("encode_tables: column lengths differ");
  }
  TensorColumns t;
  t.count = n;
  t.kind = kind.data();
  t.storage = storage.data();
  t.dtype = dtype.data();
  t.dim_begin = dim_begin.data();
  t.ndim = ndim.data();
  t.offset = offset.data();
  t.flags = flags.data();
  t.shapes = shapes.data();
  t.strides = strides.data();
  t.dims = static_cast<size_t>(shapes.size());
  std::string tensors, storages;
  {
    py::gil_scoped_release release;
    tensors = encode_tensor_rows(t, dtype_names);
    storages = encode_storage_rows(k, storage_offsets.data(), storage_nbytes.data(), device.data(), devices);
  }
  return py::make_tuple(py::bytes(tensors), py::bytes(storages));
}

}  // namespace tensorfile::python
