// Python bindings for the engine: names, argument conversion, a GIL release around every
// transfer, and the one place where C++ exceptions become Python exceptions.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cerrno>
#include <cstring>

#include "crc32c.hpp"
#include "engine.hpp"
#include "errors.hpp"
#include "file.hpp"
#include "header.hpp"

namespace py = pybind11;
using namespace tensorfile;

namespace {

constexpr int kIn = py::array::c_style | py::array::forcecast;
using U64Array = py::array_t<uint64_t, kIn>;

std::vector<Region> to_regions(const U64Array& ptrs, const U64Array& nbytes, const U64Array& offsets) {
  if (ptrs.ndim() != 1 || nbytes.ndim() != 1 || offsets.ndim() != 1 || ptrs.shape(0) != nbytes.shape(0) ||
      ptrs.shape(0) != offsets.shape(0)) {
    throw std::invalid_argument("ptrs, nbytes and file_offsets must be 1-d arrays of one length");
  }
  const auto n = static_cast<size_t>(ptrs.shape(0));
  std::vector<Region> regions(n);
  const uint64_t* p = ptrs.data();
  const uint64_t* b = nbytes.data();
  const uint64_t* o = offsets.data();
  for (size_t i = 0; i < n; i++) regions[i] = Region{static_cast<uintptr_t>(p[i]), b[i], o[i]};
  return regions;
}

template <typename T>
py::array_t<T> to_array(const std::vector<T>& v) {
  py::array_t<T> out(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::memcpy(out.mutable_data(), v.data(), v.size() * sizeof(T));
  return out;
}

TransferOptions options(size_t num_threads, size_t task_nbytes, bool checksum, bool hugepages = false) {
  TransferOptions o;
  o.hugepages = hugepages;
  o.num_threads = num_threads;
  o.task_nbytes = task_nbytes;
  o.checksum = checksum;
  return o;
}

}  // namespace

PYBIND11_MODULE(_engine, m) {
  m.doc() = "tensorfile's native engine: parallel checksummed transfers between memory and files";

  // The one translation table: FormatError -> tensorfile.FormatError, IoError -> OSError
  // (errno picks the subclass, e.g. FileNotFoundError), invalid_argument -> ValueError.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const FormatError& e) {
      py::object cls = py::module_::import("tensorfile._errors").attr("FormatError");
      PyErr_SetString(cls.ptr(), e.what());
    } catch (const IoError& e) {
      py::object err = py::reinterpret_steal<py::object>(
          PyObject_CallFunction(PyExc_OSError, "iss", e.error_number(), e.what(), e.path().c_str()));
      if (err) PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(err.ptr())), err.ptr());
    }
  });

  m.def(
      "write_regions",
      [](int fd, const U64Array& ptrs, const U64Array& nbytes, const U64Array& offsets, size_t num_threads,
         size_t task_nbytes, bool checksum, const std::string& path) {
        auto regions = to_regions(ptrs, nbytes, offsets);
        std::vector<uint32_t> crcs;
        {
          py::gil_scoped_release release;
          crcs = write_regions(fd, regions, options(num_threads, task_nbytes, checksum), path);
        }
        return to_array(crcs);
      },
      py::arg("fd"), py::arg("ptrs"), py::arg("nbytes"), py::arg("file_offsets"), py::arg("num_threads"),
      py::arg("task_nbytes"), py::arg("checksum"), py::arg("path"),
      "Write host memory regions at file offsets; returns the CRC32C of each region.");

  m.def(
      "read_regions",
      [](int fd, const U64Array& ptrs, const U64Array& nbytes, const U64Array& offsets, size_t num_threads,
         size_t task_nbytes, bool checksum, bool check_gaps, uint64_t gap_begin, uint64_t gap_end,
         const std::string& path, bool hugepages) {
        auto regions = to_regions(ptrs, nbytes, offsets);
        std::vector<uint32_t> crcs;
        {
          py::gil_scoped_release release;
          crcs = read_regions(fd, regions, options(num_threads, task_nbytes, checksum, hugepages), check_gaps,
                              gap_begin, gap_end, path);
        }
        return to_array(crcs);
      },
      py::arg("fd"), py::arg("ptrs"), py::arg("nbytes"), py::arg("file_offsets"), py::arg("num_threads"),
      py::arg("task_nbytes"), py::arg("checksum"), py::arg("check_gaps"), py::arg("gap_begin"), py::arg("gap_end"),
      py::arg("path"), py::arg("hugepages") = false,
      "Read file regions into host memory; returns the CRC32C of each region.");

  m.def(
      "checksum_regions",
      [](const U64Array& ptrs, const U64Array& nbytes, size_t num_threads, size_t task_nbytes) {
        U64Array offsets(ptrs.size());
        std::memset(offsets.mutable_data(), 0, sizeof(uint64_t) * static_cast<size_t>(ptrs.size()));
        auto regions = to_regions(ptrs, nbytes, offsets);
        std::vector<uint32_t> crcs;
        {
          py::gil_scoped_release release;
          crcs = checksum_regions(regions, options(num_threads, task_nbytes, true));
        }
        return to_array(crcs);
      },
      py::arg("ptrs"), py::arg("nbytes"), py::arg("num_threads"), py::arg("task_nbytes"),
      "CRC32C of each host memory region, in parallel.");

  m.def(
      "crc32c",
      [](py::object data, uint32_t crc, bool software) {
        // PyBUF_SIMPLE: only contiguous buffers are accepted (BufferError otherwise), so
        // the bytes checksummed are exactly the bytes of the object.
        Py_buffer view;
        if (PyObject_GetBuffer(data.ptr(), &view, PyBUF_SIMPLE) != 0) throw py::error_already_set();
        uint32_t out;
        {
          py::gil_scoped_release release;
          out = software ? crc32c_software(view.buf, static_cast<size_t>(view.len), crc)
                         : crc32c(view.buf, static_cast<size_t>(view.len), crc);
        }
        PyBuffer_Release(&view);
        return out;
      },
      py::arg("data"), py::arg("crc") = 0, py::arg("software") = false,
      "CRC32C of a contiguous buffer, continuing from `crc`.");
  m.def(
      "decode_header",
      [](py::buffer header, uint64_t file_nbytes,
         const std::vector<std::tuple<int, std::string, uint64_t, bool>>& dtypes) -> py::object {
        std::vector<DtypeInfo> table;
        for (const auto& [kind, name, itemsize, grad_ok] : dtypes)
          table.push_back(DtypeInfo{kind, name, itemsize, grad_ok});
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
        if (!t.tensors.empty())
          std::memcpy(tensors.mutable_data(), t.tensors.data(), t.tensors.size() * sizeof(int64_t));
        return py::make_tuple(t.tree_begin, t.tree_end, t.metadata_begin, t.metadata_end, to_array(t.storage_offsets),
                              to_array(t.storage_nbytes), to_array(t.storage_crcs), to_array(t.storage_device),
                              t.devices, to_array(t.storage_kind), tensors, to_array(t.shapes), to_array(t.strides));
      },
      py::arg("header"), py::arg("file_nbytes"), py::arg("dtypes"),
      "Tables of a canonical header, validated; None where the full validator must decide.");
  m.def(
      "encode_tables",
      [](const py::array_t<int8_t, kIn>& kind, const py::array_t<int64_t, kIn>& storage,
         const py::array_t<int32_t, kIn>& dtype, const py::array_t<int64_t, kIn>& dim_begin,
         const py::array_t<int64_t, kIn>& ndim, const py::array_t<int64_t, kIn>& offset,
         const py::array_t<int64_t, kIn>& flags, const py::array_t<int64_t, kIn>& shapes,
         const py::array_t<int64_t, kIn>& strides, const std::vector<std::string>& dtype_names,
         const U64Array& storage_offsets, const U64Array& storage_nbytes, const py::array_t<int32_t, kIn>& device,
         const std::vector<std::string>& devices) {
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
      },
      py::arg("kind"), py::arg("storage"), py::arg("dtype"), py::arg("dim_begin"), py::arg("ndim"), py::arg("offset"),
      py::arg("flags"), py::arg("shapes"), py::arg("strides"), py::arg("dtype_names"), py::arg("storage_offsets"),
      py::arg("storage_nbytes"), py::arg("device"), py::arg("devices"),
      "The header's tensor and storage tables as compact JSON arrays (bytes).");
  m.def("crc32c_combine", &crc32c_combine, py::arg("crc_a"), py::arg("crc_b"), py::arg("nbytes_b"));
  m.def("crc32c_hardware", &crc32c_hardware);

  m.def(
      "preallocate",
      [](int fd, uint64_t nbytes, const std::string& path) {
        py::gil_scoped_release release;
        preallocate(fd, nbytes, path);
      },
      py::arg("fd"), py::arg("nbytes"), py::arg("path"));
  m.def("advise_hugepages", &advise_hugepages, py::arg("ptr"), py::arg("nbytes"));
  m.def("_inject_write_fault", &inject_write_fault, py::arg("countdown"), py::arg("error_number"),
        "Test hook: the countdown-th following write fails with error_number (0 disarms).");
}
