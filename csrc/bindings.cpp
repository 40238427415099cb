// Python bindings for the engine: names, argument conversion, a GIL release around every
// transfer, and the one place where C++ exceptions become Python exceptions.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cerrno>
#include <cstring>

#include "crc32.hpp"
#include "crc32c.hpp"
#include "engine.hpp"
#include "errors.hpp"
#include "file.hpp"

namespace py = pybind11;
using namespace tensorfile;

namespace {

using U64Array = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>;

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

py::array_t<uint32_t> to_array(const std::vector<uint32_t>& v) {
  py::array_t<uint32_t> out(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::memcpy(out.mutable_data(), v.data(), v.size() * sizeof(uint32_t));
  return out;
}

TransferOptions options(size_t num_threads, size_t task_nbytes, bool checksum, bool hugepages = false,
                        bool zip_crc = false) {
  TransferOptions o;
  o.hugepages = hugepages;
  o.zip_crc = zip_crc;
  o.num_threads = num_threads;
  o.task_nbytes = task_nbytes;
  o.checksum = checksum;
  return o;
}

// A checksum of a contiguous buffer, continuing from `crc`. PyBUF_SIMPLE accepts only
// contiguous buffers (BufferError otherwise), so the bytes checksummed are exactly the
// bytes of the object.
uint32_t buffer_checksum(py::object data, uint32_t crc, uint32_t (*fn)(const void*, size_t, uint32_t) noexcept) {
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
         const std::string& path, bool hugepages, bool zip_crc) {
        auto regions = to_regions(ptrs, nbytes, offsets);
        std::vector<uint32_t> crcs;
        {
          py::gil_scoped_release release;
          crcs = read_regions(fd, regions, options(num_threads, task_nbytes, checksum, hugepages, zip_crc), check_gaps,
                              gap_begin, gap_end, path);
        }
        return to_array(crcs);
      },
      py::arg("fd"), py::arg("ptrs"), py::arg("nbytes"), py::arg("file_offsets"), py::arg("num_threads"),
      py::arg("task_nbytes"), py::arg("checksum"), py::arg("check_gaps"), py::arg("gap_begin"), py::arg("gap_end"),
      py::arg("path"), py::arg("hugepages") = false, py::arg("zip_crc") = false,
      "Read file regions into host memory; returns the CRC32C (or zip CRC-32) of each region.");

  m.def(
      "checksum_regions",
      [](const U64Array& ptrs, const U64Array& nbytes, size_t num_threads, size_t task_nbytes, bool zip_crc) {
        U64Array offsets(ptrs.size());
        std::memset(offsets.mutable_data(), 0, sizeof(uint64_t) * static_cast<size_t>(ptrs.size()));
        auto regions = to_regions(ptrs, nbytes, offsets);
        std::vector<uint32_t> crcs;
        {
          py::gil_scoped_release release;
          crcs = checksum_regions(regions, options(num_threads, task_nbytes, true, false, zip_crc));
        }
        return to_array(crcs);
      },
      py::arg("ptrs"), py::arg("nbytes"), py::arg("num_threads"), py::arg("task_nbytes"), py::arg("zip_crc") = false,
      "CRC32C (or zip CRC-32) of each host memory region, in parallel.");

  m.def(
      "crc32c",
      [](py::object data, uint32_t crc, bool software) {
        return buffer_checksum(std::move(data), crc, software ? &crc32c_software : &crc32c);
      },
      py::arg("data"), py::arg("crc") = 0, py::arg("software") = false,
      "CRC32C of a contiguous buffer, continuing from `crc`.");
  m.def(
      "crc32_zip",
      [](py::object data, uint32_t crc, bool software) {
        return buffer_checksum(std::move(data), crc, software ? &crc32_zip_software : &crc32_zip);
      },
      py::arg("data"), py::arg("crc") = 0, py::arg("software") = false,
      "zip's CRC-32 (zlib.crc32) of a contiguous buffer, continuing from `crc`.");
  m.def("crc32_zip_combine", &crc32_zip_combine, py::arg("crc_a"), py::arg("crc_b"), py::arg("nbytes_b"));
  m.def("crc32_zip_hardware", &crc32_zip_hardware);
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
