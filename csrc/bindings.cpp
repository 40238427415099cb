// Python bindings for the engine: names, argument conversion, a GIL release around every
// transfer, and the one place where C++ exceptions become Python exceptions.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <numeric>

#include "crc32.hpp"
#include "crc32c.hpp"
#include "device.hpp"
#include "engine.hpp"
#include "errors.hpp"
#include "file.hpp"
#include "header.hpp"
#include "plan.hpp"
#include "pytree.hpp"
#include "shim/cuda.hpp"
#include "shim/cufile.hpp"
#include "staging.hpp"

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

// Regions in file order, as the engine reads them, and each region's result put back in
// the caller's order: a torch.save zip numbers its storages in pickle order, which need not
// be the order of their records in the file.
class FileOrder {
 public:
  explicit FileOrder(std::vector<Region>& regions) {
    const auto by_offset = [](const Region& a, const Region& b) { return a.file_offset < b.file_offset; };
    if (std::is_sorted(regions.begin(), regions.end(), by_offset)) return;
    order_.resize(regions.size());
    std::iota(order_.begin(), order_.end(), size_t{0});
    std::stable_sort(order_.begin(), order_.end(),
                     [&](size_t a, size_t b) { return regions[a].file_offset < regions[b].file_offset; });
    std::vector<Region> sorted(regions.size());
    for (size_t k = 0; k < order_.size(); k++) sorted[k] = regions[order_[k]];
    regions.swap(sorted);
  }

  std::vector<uint32_t> restore(std::vector<uint32_t> results) const {
    if (order_.empty()) return results;
    std::vector<uint32_t> out(results.size());
    for (size_t k = 0; k < order_.size(); k++) out[order_[k]] = results[k];
    return out;
  }

 private:
  std::vector<size_t> order_;  // empty: the regions were in file order already
};

template <typename T>
py::array_t<T> to_array(const std::vector<T>& v) {
  py::array_t<T> out(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::memcpy(out.mutable_data(), v.data(), v.size() * sizeof(T));
  return out;
}

TransferOptions options(size_t num_threads, size_t task_nbytes, bool checksum, bool hugepages = false,
                        bool zip_crc = false, bool writeback = false) {
  TransferOptions o;
  o.writeback = writeback;
  o.hugepages = hugepages;
  o.zip_crc = zip_crc;
  o.num_threads = num_threads;
  o.task_nbytes = task_nbytes;
  o.checksum = checksum;
  return o;
}

Device& device_for(const std::string& backend, int index) {
  if (backend == "cuda") return cuda_device(index);
  if (backend == "sim") return sim_device();
  throw std::invalid_argument("backend must be 'cuda' or 'sim', got '" + backend + "'");
}

StagingOptions staging(size_t num_threads, size_t staging_nbytes, size_t staging_buffers, bool checksum, int gds_fd,
                       bool zip_crc = false) {
  StagingOptions o;
  o.zip_crc = zip_crc;
  o.num_threads = num_threads;
  o.staging_nbytes = staging_nbytes;
  o.staging_buffers = staging_buffers;
  o.checksum = checksum;
  o.gds_fd = gds_fd;
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

// An int from a list the planner gathered from torch; false when it is not one that fits.
bool int_item(PyObject* o, int64_t* out) {
  int overflow = 0;
  *out = PyLong_AsLongLongAndOverflow(o, &overflow);
  if (overflow != 0 || (*out == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    return false;
  }
  return true;
}

// The planner's fast path (tensorfile/_plan.py): per-tensor lists of torch metadata, one
// list per attribute, in; the tensor table's columns and the storages out. None when an
// item is not what dense torch tensors give, so that the caller describes each tensor.
py::object plan_tensors(const py::list& sizes, const py::list& strides, const py::list& data_ptrs,
                        const py::list& storage_offsets, const py::list& requires_grad, const py::list& dtypes,
                        const py::dict& dtype_codes, const std::vector<int64_t>& itemsizes, const py::list& types,
                        const py::handle& flagged_type, int64_t type_flag, int64_t grad_flag,
                        const py::function& storage_ptr, int64_t align) {
  const auto n = static_cast<size_t>(PyList_GET_SIZE(sizes.ptr()));
  for (const auto* l : {&strides, &data_ptrs, &storage_offsets, &requires_grad, &dtypes, &types}) {
    if (static_cast<size_t>(PyList_GET_SIZE(l->ptr())) != n)
      throw std::invalid_argument("plan_tensors: list lengths differ");
  }
  TensorSpans t;
  t.ndim.resize(n);
  t.first.resize(n);
  t.end.resize(n);
  t.storage.resize(n);
  t.shapes.reserve(n);  // one dim each, the common case; more grow the vectors
  t.strides.reserve(n);
  std::vector<int32_t> dtype(n);
  std::vector<int64_t> flags(n), dim_begin(n);
  std::vector<size_t> empties;
  for (size_t i = 0; i < n; i++) {
    PyObject* size = PyList_GET_ITEM(sizes.ptr(), i);
    PyObject* stride = PyList_GET_ITEM(strides.ptr(), i);
    if (!PyTuple_Check(size) || !PyTuple_Check(stride) || PyTuple_GET_SIZE(size) != PyTuple_GET_SIZE(stride)) {
      return py::none();
    }
    const Py_ssize_t ndim = PyTuple_GET_SIZE(size);
    dim_begin[i] = static_cast<int64_t>(t.shapes.size());
    t.ndim[i] = ndim;
    for (Py_ssize_t k = 0; k < ndim; k++) {
      int64_t d = 0, s = 0;
      if (!int_item(PyTuple_GET_ITEM(size, k), &d) || !int_item(PyTuple_GET_ITEM(stride, k), &s) || d < 0 || s < 0) {
        return py::none();
      }
      t.shapes.push_back(d);
      t.strides.push_back(s);
    }
    PyObject* code = PyDict_GetItemWithError(dtype_codes.ptr(), PyList_GET_ITEM(dtypes.ptr(), i));
    int64_t c = 0, offset = 0;
    if (code == nullptr || !int_item(code, &c) || c < 0 || static_cast<size_t>(c) >= itemsizes.size() ||
        !int_item(PyList_GET_ITEM(storage_offsets.ptr(), i), &offset) || offset < 0) {
      PyErr_Clear();
      return py::none();
    }
    dtype[i] = static_cast<int32_t>(c);
    const int64_t itemsize = itemsizes[static_cast<size_t>(c)];
    bool empty = false;
    if (__builtin_mul_overflow(offset, itemsize, &t.first[i]) ||
        !tensor_end(t.first[i], itemsize, t.shapes.data() + dim_begin[i], t.strides.data() + dim_begin[i], ndim,
                    &t.end[i], &empty)) {
      return py::none();
    }
    const unsigned long long ptr = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(data_ptrs.ptr(), i));
    if (ptr == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
      PyErr_Clear();
      return py::none();
    }
    // A tensor's data pointer is its storage's plus its byte offset, which spares creating
    // a storage object per tensor; only an empty tensor's may be null.
    t.storage[i] = static_cast<uint64_t>(ptr) - static_cast<uint64_t>(t.first[i]);
    if (empty) empties.push_back(i);
    flags[i] = (PyList_GET_ITEM(requires_grad.ptr(), i) == Py_True ? grad_flag : 0) |
               (PyList_GET_ITEM(types.ptr(), i) == flagged_type.ptr() ? type_flag : 0);
  }
  for (size_t i : empties) t.storage[i] = storage_ptr(i).cast<uint64_t>();
  const StorageGroups g = group_storages(t, align);
  return py::make_tuple(to_array(dtype), to_array(dim_begin), to_array(t.ndim), to_array(t.shapes), to_array(t.strides),
                        to_array(g.offset), to_array(flags), to_array(g.storage), to_array(g.lead), to_array(g.ptrs),
                        to_array(g.nbytes));
}

}  // namespace

PYBIND11_MODULE(_engine, m) {
  m.doc() = "tensorfile's native engine: parallel checksummed transfers between memory and files";

  // The one translation table: FormatError -> tensorfile.FormatError, IoError -> OSError
  // (errno picks the subclass, e.g. FileNotFoundError), CudaError -> tensorfile.CudaError,
  // invalid_argument -> ValueError.
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
    } catch (const CudaError& e) {
      py::object cls = py::module_::import("tensorfile._errors").attr("CudaError");
      PyErr_SetObject(cls.ptr(), cls(e.what(), e.call(), e.name()).ptr());
    }
  });

  m.def(
      "write_regions",
      [](int fd, const U64Array& ptrs, const U64Array& nbytes, const U64Array& offsets, size_t num_threads,
         size_t task_nbytes, bool checksum, const std::string& path, bool writeback) {
        auto regions = to_regions(ptrs, nbytes, offsets);
        std::vector<uint32_t> crcs;
        {
          py::gil_scoped_release release;
          crcs = write_regions(fd, regions, options(num_threads, task_nbytes, checksum, false, false, writeback), path);
        }
        return to_array(crcs);
      },
      py::arg("fd"), py::arg("ptrs"), py::arg("nbytes"), py::arg("file_offsets"), py::arg("num_threads"),
      py::arg("task_nbytes"), py::arg("checksum"), py::arg("path"), py::arg("writeback") = false,
      "Write host memory regions at file offsets; returns the CRC32C of each region. writeback=True "
      "starts the disk write of each task's bytes as soon as they are written (for a save that fsyncs).");

  m.def(
      "read_regions",
      [](int fd, const U64Array& ptrs, const U64Array& nbytes, const U64Array& offsets, size_t num_threads,
         size_t task_nbytes, bool checksum, bool check_gaps, uint64_t gap_begin, uint64_t gap_end,
         const std::string& path, bool hugepages, bool zip_crc) {
        auto regions = to_regions(ptrs, nbytes, offsets);
        const FileOrder order(regions);
        std::vector<uint32_t> crcs;
        {
          py::gil_scoped_release release;
          crcs = read_regions(fd, regions, options(num_threads, task_nbytes, checksum, hugepages, zip_crc), check_gaps,
                              gap_begin, gap_end, path);
        }
        return to_array(order.restore(std::move(crcs)));
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
  m.def(
      "encode_tree", [](py::handle tree, int max_depth) { return py::bytes(encode_tree_json(tree, max_depth)); },
      py::arg("tree"), py::arg("max_depth"),
      "The header's object tree (or metadata) as json.dumps writes it with compact separators and ASCII only.");
  m.def("tensor_dict_items", &tensor_dict_items, py::arg("keys"), py::arg("values"), py::arg("tensor_type"),
        py::arg("param_type"), py::arg("first"),
        "[key0, ['tensor', first], ...] for a dict of ASCII str keys to distinct tensors or Parameters; else None.");
  m.def("plan_tensors", &plan_tensors, py::arg("sizes"), py::arg("strides"), py::arg("data_ptrs"),
        py::arg("storage_offsets"), py::arg("requires_grad"), py::arg("dtypes"), py::arg("dtype_codes"),
        py::arg("itemsizes"), py::arg("types"), py::arg("flagged_type"), py::arg("type_flag"), py::arg("grad_flag"),
        py::arg("storage_ptr"), py::arg("align"),
        "(dtype, dim_begin, ndim, shapes, strides, offset, flags, storage, lead, ptrs, nbytes) from per-tensor "
        "lists of torch metadata; None when an item is not what a dense tensor gives.");
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

  m.def("cuda_load", &cuda::load, py::arg("path") = "",
        "Opens libcudart (the given path, else the one in the process, else the system's); never raises.");
  m.def("cuda_available", &cuda::available, "True when libcudart loaded and a device is visible; never raises.");
  m.def("cuda_error", &cuda::load_error, "Why CUDA is unavailable ('' when it is available).");
  m.def("cuda_library", &cuda::library_path, "The libcudart that was opened ('' when none).");
  m.def("cufile_load", &cufile::load, py::arg("path") = "",
        "Opens libcufile and the cuFile driver (the given path, else libcufile.so.0); never raises.");
  m.def("cufile_error", &cufile::load_error, "Why cuFile is unavailable ('' when it is available).");

  m.def(
      "device_read_regions",
      [](const std::string& backend, int device, int fd, const U64Array& ptrs, const U64Array& nbytes,
         const U64Array& offsets, const U64Array& zero_offsets, const U64Array& zero_nbytes, size_t num_threads,
         size_t staging_nbytes, size_t staging_buffers, bool checksum, const std::string& path, int gds_fd,
         bool zip_crc) {
        auto regions = to_regions(ptrs, nbytes, offsets);
        const FileOrder order(regions);
        auto zr = to_regions(zero_offsets, zero_nbytes, zero_offsets);
        std::vector<ZeroRange> zeros(zr.size());
        for (size_t i = 0; i < zr.size(); i++) zeros[i] = ZeroRange{zr[i].file_offset, zr[i].nbytes};
        std::vector<uint32_t> crcs;
        {
          py::gil_scoped_release release;
          Device& dev = device_for(backend, device);
          crcs = read_to_device(dev, fd, regions, zeros,
                                staging(num_threads, staging_nbytes, staging_buffers, checksum, gds_fd, zip_crc), path);
        }
        return to_array(order.restore(std::move(crcs)));
      },
      py::arg("backend"), py::arg("device"), py::arg("fd"), py::arg("ptrs"), py::arg("nbytes"), py::arg("file_offsets"),
      py::arg("zero_offsets"), py::arg("zero_nbytes"), py::arg("num_threads"), py::arg("staging_nbytes"),
      py::arg("staging_buffers"), py::arg("checksum"), py::arg("path"), py::arg("gds_fd") = -1,
      py::arg("zip_crc") = false,
      "Read file regions into device memory through pinned staging buffers (or cuFile when gds_fd >= 0), "
      "checking that the zero ranges hold zeros; returns the CRC32C (zip's CRC-32 with zip_crc) of each region.");

  m.def(
      "device_write_regions",
      [](const std::string& backend, int device, int fd, const U64Array& ptrs, const U64Array& nbytes,
         const U64Array& offsets, size_t num_threads, size_t staging_nbytes, size_t staging_buffers, bool checksum,
         const std::string& path, int gds_fd) {
        auto regions = to_regions(ptrs, nbytes, offsets);
        std::vector<uint32_t> crcs;
        {
          py::gil_scoped_release release;
          Device& dev = device_for(backend, device);
          crcs = write_from_device(dev, fd, regions,
                                   staging(num_threads, staging_nbytes, staging_buffers, checksum, gds_fd), path);
        }
        return to_array(crcs);
      },
      py::arg("backend"), py::arg("device"), py::arg("fd"), py::arg("ptrs"), py::arg("nbytes"), py::arg("file_offsets"),
      py::arg("num_threads"), py::arg("staging_nbytes"), py::arg("staging_buffers"), py::arg("checksum"),
      py::arg("path"), py::arg("gds_fd") = -1,
      "Write device memory regions at file offsets through pinned staging buffers (or cuFile when gds_fd >= 0); "
      "returns the CRC32C of each region.");

  m.def(
      "staging_trim",
      [](const std::string& backend, int device) {
        py::gil_scoped_release release;
        return device_for(backend, device).trim_pinned();
      },
      py::arg("backend"), py::arg("device") = 0, "Frees the cached pinned staging buffers; returns how many.");

  // Test hooks for the simulated device.
  m.def("_sim_alloc", &sim_alloc, py::arg("nbytes"));
  m.def("_sim_free", &sim_free, py::arg("ptr"));
  m.def(
      "_sim_read",
      [](uintptr_t ptr, size_t nbytes) {
        std::string out(nbytes, '\0');
        sim_read(ptr, out.data(), nbytes);
        return py::bytes(out);
      },
      py::arg("ptr"), py::arg("nbytes"));
  m.def(
      "_sim_write",
      [](uintptr_t ptr, const py::bytes& data) {
        std::string s = data;
        sim_write(ptr, s.data(), s.size());
      },
      py::arg("ptr"), py::arg("data"));
  m.def("_sim_configure", &sim_configure, py::arg("copy_fault_countdown"), py::arg("delay_us"));
  m.def("_sim_reset_peak", &sim_reset_peak);
  m.def("_sim_counters", [] {
    SimCounters c = sim_counters();
    py::dict d;
    d["pinned_live"] = c.pinned_live;
    d["pinned_in_use"] = c.pinned_in_use;
    d["pinned_peak"] = c.pinned_peak;
    d["streams_live"] = c.streams_live;
    d["events_live"] = c.events_live;
    d["threads_live"] = c.threads_live;
    d["device_allocs_live"] = c.device_allocs_live;
    d["copies"] = c.copies;
    return d;
  });
}
