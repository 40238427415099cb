// dlopen-based binding of libcufile (see cufile.hpp).
#include "shim/cufile.hpp"

#include <dlfcn.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <mutex>

#include "errors.hpp"

namespace tensorfile::cufile {

namespace {

struct State {
  std::once_flag once;
  bool loaded = false;
  Api api{};
  std::string error;
};

State& state() {
  static State* s = new State();  // leaked: worker threads may use it at exit
  return *s;
}

template <typename F>
bool bind(void* h, const char* name, F& slot, std::string& error) {
  slot = reinterpret_cast<F>(dlsym(h, name));
  if (!slot) error = std::string("libcufile lacks ") + name;
  return slot != nullptr;
}

// cufile.h's CUfileOpError names, from the header itself (cufile_errors.inc).
std::string op_error_name(int err) {
  switch (err) {
#define TF_CUFILE_ERROR(code, name) \
  case code:                        \
    return #name;
#include "shim/cufile_errors.inc"
#undef TF_CUFILE_ERROR
    default:
      return "CU_FILE_ERROR_" + std::to_string(err);
  }
}

void do_load(State& s, const std::string& path) {
  const std::string name = path.empty() ? "libcufile.so.0" : path;
  void* h = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    const char* why = dlerror();
    s.error = "cannot open " + name + (why ? std::string(": ") + why : std::string());
    return;
  }
  Api& a = s.api;
  bool ok = bind(h, "cuFileDriverOpen", a.DriverOpen, s.error) &&
            bind(h, "cuFileHandleRegister", a.HandleRegister, s.error) &&
            bind(h, "cuFileHandleDeregister", a.HandleDeregister, s.error) &&
            bind(h, "cuFileBufRegister", a.BufRegister, s.error) &&
            bind(h, "cuFileBufDeregister", a.BufDeregister, s.error) && bind(h, "cuFileRead", a.Read, s.error) &&
            bind(h, "cuFileWrite", a.Write, s.error);
  if (!ok) return;
  Error e = a.DriverOpen();
  if (e.err != 0) {
    s.error = "cuFileDriverOpen failed: " + op_error_name(e.err) + " (CUresult " + std::to_string(e.cu_err) + ")";
    return;
  }
  s.loaded = true;
}

[[noreturn]] void throw_transfer(ssize_t got, const char* call, const std::string& path, uint64_t file_offset) {
  // cuFileRead/Write return -1 with errno for system errors, -CUfileOpError otherwise.
  if (got == -1) {
    int err = errno;
    throw IoError(
        err, path,
        std::string(std::strerror(err)) + " in " + call + " on " + path + " at offset " + std::to_string(file_offset));
  }
  std::string name = op_error_name(static_cast<int>(-got));
  throw CudaError(call, name,
                  std::string(call) + " failed on " + path + " at offset " + std::to_string(file_offset) + ": " + name);
}

}  // namespace

bool load(const std::string& path) noexcept {
  State& s = state();
  try {
    std::call_once(s.once, [&] { do_load(s, path); });
  } catch (...) {
    return false;
  }
  return s.loaded;
}

bool available() noexcept { return load(); }

std::string load_error() {
  load();
  return state().error;
}

const Api& api() {
  if (!load()) throw CudaError("dlopen", "CU_FILE_DRIVER_NOT_INITIALIZED", "cuFile unavailable: " + state().error);
  return state().api;
}

void check(Error e, const char* call) {
  if (e.err == 0) return;
  std::string name = op_error_name(e.err);
  throw CudaError(call, name, std::string(call) + " failed: " + name + " (CUresult " + std::to_string(e.cu_err) + ")");
}

FileHandle::FileHandle(int fd, const std::string& path) {
  Descr d{};
  d.type = kHandleTypeOpaqueFd;
  d.handle.fd = fd;
  Error e = api().HandleRegister(&handle_, &d);
  if (e.err != 0) {
    handle_ = nullptr;
    std::string name = op_error_name(e.err);
    throw CudaError("cuFileHandleRegister", name,
                    "cuFileHandleRegister failed for " + path + ": " + name +
                        " (the file system may not support GPUDirect Storage)");
  }
}

FileHandle::~FileHandle() {
  if (handle_) api().HandleDeregister(handle_);
}

BufferRegistrations::~BufferRegistrations() {
  for (const void* p : registered_) api().BufDeregister(p);
}

bool BufferRegistrations::add(const void* base, size_t nbytes) {
  registered_.reserve(registered_.size() + 1);  // so that a registered buffer is always recorded
  Error e = api().BufRegister(base, nbytes, 0);
  if (e.err != 0) return false;
  registered_.push_back(base);
  return true;
}

void read_full(const FileHandle& fh, void* dev_base, size_t nbytes, uint64_t file_offset, uint64_t dev_offset,
               const std::string& path) {
  while (nbytes > 0) {
    ssize_t got =
        api().Read(fh.get(), dev_base, nbytes, static_cast<off_t>(file_offset), static_cast<off_t>(dev_offset));
    if (got < 0) throw_transfer(got, "cuFileRead", path, file_offset);
    if (got == 0) {
      throw FormatError(path + ": unexpected end of file at offset " + std::to_string(file_offset) +
                        " (the file is truncated or was changed while being read)");
    }
    nbytes -= static_cast<size_t>(got);
    file_offset += static_cast<uint64_t>(got);
    dev_offset += static_cast<uint64_t>(got);
  }
}

void write_full(const FileHandle& fh, const void* dev_base, size_t nbytes, uint64_t file_offset, uint64_t dev_offset,
                const std::string& path) {
  while (nbytes > 0) {
    ssize_t got =
        api().Write(fh.get(), dev_base, nbytes, static_cast<off_t>(file_offset), static_cast<off_t>(dev_offset));
    if (got < 0) throw_transfer(got, "cuFileWrite", path, file_offset);
    if (got == 0) throw IoError(EIO, path, "cuFileWrite wrote nothing to " + path);
    nbytes -= static_cast<size_t>(got);
    file_offset += static_cast<uint64_t>(got);
    dev_offset += static_cast<uint64_t>(got);
  }
}

}  // namespace tensorfile::cufile
