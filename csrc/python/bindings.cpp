// Python bindings for the engine: names, argument conversion, a GIL release around every
// transfer, and the one place where C++ exceptions become Python exceptions. Logic lives
// in the engine or in the other files of this folder, never here.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <utility>
#include <vector>

#include "crc32.hpp"
#include "crc32c.hpp"
#include "device.hpp"
#include "engine.hpp"
#include "errors.hpp"
#include "file.hpp"
#include "python/convert.hpp"
#include "python/header_tables.hpp"
#include "python/plan_lists.hpp"
#include "python/pytree.hpp"
#include "shim/cuda.hpp"
#include "shim/cufile.hpp"
#include "staging.hpp"
#include "testing/sim_device.hpp"
#include "testing/write_faults.hpp"
#include "xxh3.hpp"

namespace py = pybind11;
using namespace tensorfile;
using namespace tensorfile::python;

PYBIND11_MODULE(_engine, m) {
  m.doc() = "tensorfile's native engine: parallel checksummed transfers between memory and files";

  // The one translation table: FormatError -> tensorfile.FormatError, IoError -> OSError
  // (errno picks the subclass, e.g. FileNotFoundError), CudaError -> tensorfile.CudaError;
  // pybind11 itself maps std::invalid_argument and std::length_error to ValueError and
  // std::bad_alloc to MemoryError.
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

  // ------------------------------------------------------------------ host transfers

  m.def(
      "write_regions",
      [](int fd, const U64Array& ptrs, const U64Array& nbytes, const U64Array& file_offsets, size_t num_threads,
         size_t task_nbytes, bool checksum, const std::string& path, bool writeback) {
        const auto regions = to_regions(ptrs, nbytes, file_offsets);
        const auto options = transfer_options(num_threads, task_nbytes, checksum, false, false, writeback);
        std::vector<uint32_t> crcs;
        {
          py::gil_scoped_release release;
          crcs = write_regions(fd, regions, options, path);
        }
        return to_array(crcs);
      },
      py::kw_only(), py::arg("fd"), py::arg("ptrs"), py::arg("nbytes"), py::arg("file_offsets"), py::arg("num_threads"),
      py::arg("task_nbytes"), py::arg("checksum"), py::arg("path"), py::arg("writeback") = false,
      "Write host memory regions (sorted by file offset) at their file offsets; returns the CRC32C of each region, "
      "computed from the bytes written. writeback=True starts the disk write of each task's bytes as soon as they "
      "are written (for a save that fsyncs).");

  m.def(
      "read_regions",
      [](int fd, const U64Array& ptrs, const U64Array& nbytes, const U64Array& file_offsets, size_t num_threads,
         size_t task_nbytes, bool checksum, bool check_gaps, uint64_t gap_begin, uint64_t gap_end,
         const std::string& path, bool hugepages, bool zip_crc) {
        const auto regions = to_regions(ptrs, nbytes, file_offsets);
        const auto options = transfer_options(num_threads, task_nbytes, checksum, zip_crc, hugepages);
        std::vector<uint32_t> crcs;
        {
          py::gil_scoped_release release;
          crcs = read_regions(fd, regions, options, check_gaps, gap_begin, gap_end, path);
        }
        return to_array(crcs);
      },
      py::kw_only(), py::arg("fd"), py::arg("ptrs"), py::arg("nbytes"), py::arg("file_offsets"), py::arg("num_threads"),
      py::arg("task_nbytes"), py::arg("checksum"), py::arg("check_gaps"), py::arg("gap_begin"), py::arg("gap_end"),
      py::arg("path"), py::arg("hugepages") = false, py::arg("zip_crc") = false,
      "Read file regions (in any order) into host memory; returns the CRC32C (or zip CRC-32) of each region, in the "
      "order given.");

  m.def(
      "checksum_regions",
      [](const U64Array& ptrs, const U64Array& nbytes, size_t num_threads, size_t task_nbytes, bool zip_crc) {
        const auto regions = to_regions(ptrs, nbytes);
        const auto options = transfer_options(num_threads, task_nbytes, true, zip_crc);
        std::vector<uint32_t> crcs;
        {
          py::gil_scoped_release release;
          crcs = checksum_regions(regions, options);
        }
        return to_array(crcs);
      },
      py::kw_only(), py::arg("ptrs"), py::arg("nbytes"), py::arg("num_threads"), py::arg("task_nbytes"),
      py::arg("zip_crc") = false, "CRC32C (or zip CRC-32) of each host memory region, in parallel.");

  m.def(
      "hash_regions",
      [](const U64Array& addresses, const U64Array& nbytes, size_t num_threads) {
        const auto regions = to_regions(addresses, nbytes);
        std::vector<Digest128> digests;
        {
          py::gil_scoped_release release;
          digests = hash_regions(regions, num_threads);
        }
        return to_bytes_list(digests);
      },
      py::kw_only(), py::arg("addresses"), py::arg("nbytes"), py::arg("num_threads"),
      "XXH3-128 digest (16 bytes, canonical order) of each host memory region, in the order given; regions are "
      "hashed in parallel, each whole by one thread.");

  m.def(
      "hash_and_checksum_regions",
      [](const U64Array& addresses, const U64Array& nbytes, size_t num_threads) {
        const auto regions = to_regions(addresses, nbytes);
        std::vector<Digest128> digests;
        std::vector<uint32_t> crcs;
        {
          py::gil_scoped_release release;
          digests = hash_regions(regions, num_threads, &crcs);
        }
        return py::make_tuple(to_bytes_list(digests), to_array(crcs));
      },
      py::kw_only(), py::arg("addresses"), py::arg("nbytes"), py::arg("num_threads"),
      "hash_regions and the CRC32C of each region (a uint32 array), in one pass over memory.");

  m.def("preallocate", &preallocate, py::arg("fd"), py::arg("nbytes"), py::arg("path"),
        py::call_guard<py::gil_scoped_release>(), "Reserves nbytes of disk for fd (a no-op where unsupported).");

  // ------------------------------------------------------------------ device transfers

  m.def(
      "device_read_regions",
      [](const std::string& backend, int device, int fd, const U64Array& ptrs, const U64Array& nbytes,
         const U64Array& file_offsets, const U64Array& zero_offsets, const U64Array& zero_nbytes, size_t num_threads,
         size_t staging_nbytes, size_t staging_buffers, bool checksum, const std::string& path, int gds_fd,
         bool zip_crc) {
        const auto regions = to_regions(ptrs, nbytes, file_offsets);
        const auto zeros = to_zero_ranges(zero_offsets, zero_nbytes);
        const auto options = staging_options(num_threads, staging_nbytes, staging_buffers, checksum, gds_fd, zip_crc);
        std::vector<uint32_t> crcs;
        {
          py::gil_scoped_release release;
          crcs = read_to_device(find_device(backend, device), fd, regions, zeros, options, path);
        }
        return to_array(crcs);
      },
      py::kw_only(), py::arg("backend"), py::arg("device"), py::arg("fd"), py::arg("ptrs"), py::arg("nbytes"),
      py::arg("file_offsets"), py::arg("zero_offsets"), py::arg("zero_nbytes"), py::arg("num_threads"),
      py::arg("staging_nbytes"), py::arg("staging_buffers"), py::arg("checksum"), py::arg("path"),
      py::arg("gds_fd") = -1, py::arg("zip_crc") = false,
      "Read file regions (in any order) into device memory through pinned staging buffers (or cuFile when gds_fd >= "
      "0), checking that the zero ranges hold zeros; returns the CRC32C (zip's CRC-32 with zip_crc) of each region, "
      "in the order given.");

  m.def(
      "device_write_regions",
      [](const std::string& backend, int device, int fd, const U64Array& ptrs, const U64Array& nbytes,
         const U64Array& file_offsets, size_t num_threads, size_t staging_nbytes, size_t staging_buffers, bool checksum,
         const std::string& path, int gds_fd) {
        const auto regions = to_regions(ptrs, nbytes, file_offsets);
        const auto options = staging_options(num_threads, staging_nbytes, staging_buffers, checksum, gds_fd);
        std::vector<uint32_t> crcs;
        {
          py::gil_scoped_release release;
          crcs = write_from_device(find_device(backend, device), fd, regions, options, path);
        }
        return to_array(crcs);
      },
      py::kw_only(), py::arg("backend"), py::arg("device"), py::arg("fd"), py::arg("ptrs"), py::arg("nbytes"),
      py::arg("file_offsets"), py::arg("num_threads"), py::arg("staging_nbytes"), py::arg("staging_buffers"),
      py::arg("checksum"), py::arg("path"), py::arg("gds_fd") = -1,
      "Write device memory regions (sorted by file offset) at their file offsets through pinned staging buffers (or "
      "cuFile when gds_fd >= 0); returns the CRC32C of each region, computed from the staged bytes.");

  m.def(
      "staging_trim", [](const std::string& backend, int device) { return find_device(backend, device).trim_pinned(); },
      py::arg("backend"), py::arg("device") = 0, py::call_guard<py::gil_scoped_release>(),
      "Frees the cached pinned staging buffers; returns how many.");

  m.def("cuda_load", &cuda::load, py::arg("path") = "",
        "Opens libcudart (the given path, else the one in the process, else the system's); never raises.");
  m.def("cuda_available", &cuda::available, "True when libcudart loaded and a device is visible; never raises.");
  m.def("cuda_error", &cuda::load_error, "Why CUDA is unavailable ('' when it is available).");
  m.def("cuda_library", &cuda::library_path, "The libcudart that was opened ('' when none).");
  m.def("cufile_load", &cufile::load, py::arg("path") = "",
        "Opens libcufile and the cuFile driver (the given path, else libcufile.so.0); never raises.");
  m.def("cufile_error", &cufile::load_error, "Why cuFile is unavailable ('' when it is available).");

  // ------------------------------------------------------------------ checksums

  m.def(
      "crc32c",
      [](const py::object& data, uint32_t crc, bool software) {
        return buffer_checksum(data, crc, software ? &crc32c_software : &crc32c);
      },
      py::arg("data"), py::arg("crc") = 0, py::arg("software") = false,
      "CRC32C of a contiguous buffer, continuing from `crc`.");
  m.def("crc32c_combine", &crc32c_combine, py::arg("crc_a"), py::arg("crc_b"), py::arg("nbytes_b"));
  m.def("crc32c_hardware", &crc32c_hardware);
  m.def(
      "crc32_zip",
      [](const py::object& data, uint32_t crc, bool software) {
        return buffer_checksum(data, crc, software ? &crc32_zip_software : &crc32_zip);
      },
      py::arg("data"), py::arg("crc") = 0, py::arg("software") = false,
      "zip's CRC-32 (zlib.crc32) of a contiguous buffer, continuing from `crc`.");
  m.def("crc32_zip_combine", &crc32_zip_combine, py::arg("crc_a"), py::arg("crc_b"), py::arg("nbytes_b"));
  m.def("crc32_zip_hardware", &crc32_zip_hardware);
  m.def(
      "xxh3_128", [](const py::object& data) { return buffer_xxh3_128(data); }, py::arg("data"),
      "XXH3-128 (seed 0) of a contiguous buffer: 16 bytes in canonical order, as xxhash.xxh3_128_digest returns.");
  m.def(
      "_xxh3_128_with",
      [](const py::object& data, const std::string& kernel) {
        return buffer_xxh3_128(data, xxh3_kernel_named(kernel));
      },
      py::arg("data"), py::arg("kernel"),
      "Test hook: xxh3_128 with the long-input kernel named ('auto', 'scalar', 'sse2', 'avx2', 'avx512').");
  m.def(
      "_xxh3_128_parts",
      [](const py::sequence& parts, const std::string& kernel) {
        return buffer_xxh3_128_parts(parts, xxh3_kernel_named(kernel));
      },
      py::arg("parts"), py::arg("kernel") = "auto",
      "Test hook: streaming XXH3-128, one update per part; the digest after each update.");
  m.def(
      "_xxh3_kernels",
      [] {
        std::vector<std::string> names;
        for (Xxh3Kernel k : xxh3_kernels()) names.emplace_back(xxh3_kernel_name(k));
        return names;
      },
      "The long-input XXH3 kernels this CPU runs, slowest first; xxh3_128 uses the last.");

  // ------------------------------------------------------------------ header and planner

  m.def("decode_header", &decode_header_tables, py::arg("header"), py::arg("file_nbytes"), py::arg("dtypes"),
        "Tables of a canonical header, validated; None where the full validator must decide.");
  m.def("encode_tables", &encode_header_tables, py::arg("kind"), py::arg("storage"), py::arg("dtype"),
        py::arg("dim_begin"), py::arg("ndim"), py::arg("offset"), py::arg("flags"), py::arg("shapes"),
        py::arg("strides"), py::arg("dtype_names"), py::arg("storage_offsets"), py::arg("storage_nbytes"),
        py::arg("device"), py::arg("devices"),
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

  // ------------------------------------------------------------------ test doubles (testing/)

  testing::register_sim_backend();
  m.def("_inject_write_fault", &testing::inject_write_fault, py::arg("countdown"), py::arg("error_number"),
        "Test hook: the countdown-th following write fails with error_number (0 disarms).");
  m.def("_sim_alloc", &testing::sim_alloc, py::arg("nbytes"));
  m.def("_sim_free", &testing::sim_free, py::arg("ptr"));
  m.def(
      "_sim_read",
      [](uintptr_t ptr, size_t nbytes) {
        std::string out(nbytes, '\0');
        testing::sim_read(ptr, out.data(), nbytes);
        return py::bytes(out);
      },
      py::arg("ptr"), py::arg("nbytes"));
  m.def(
      "_sim_write",
      [](uintptr_t ptr, const py::bytes& data) {
        const std::string s = data;
        testing::sim_write(ptr, s.data(), s.size());
      },
      py::arg("ptr"), py::arg("data"));
  m.def("_sim_configure", &testing::sim_configure, py::arg("copy_fault_countdown"), py::arg("delay_us"));
  m.def("_sim_reset_peak", &testing::sim_reset_peak);
  m.def("_sim_counters", [] {
    const testing::SimCounters c = testing::sim_counters();
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
