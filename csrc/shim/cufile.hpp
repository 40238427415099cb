// The few cuFile (GPUDirect Storage) functions tensorfile uses, declared here and bound
// at run time with dlopen; libcufile is optional everywhere.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace tensorfile::cufile {

// Layouts from cufile.h (Linux, x86-64 and aarch64).
struct Error {
  int err;     // CUfileOpError; 0 is CU_FILE_SUCCESS, failures are 5000 and up
  int cu_err;  // CUresult of the driver call behind it
};
struct Descr {
  int type;  // CU_FILE_HANDLE_TYPE_OPAQUE_FD
  union {
    int fd;
    void* handle;
  } handle;
  const void* fs_ops;  // null for kernel file systems
};
using Handle = void*;
constexpr int kHandleTypeOpaqueFd = 1;

struct Api {
  Error (*DriverOpen)();
  Error (*HandleRegister)(Handle*, Descr*);
  void (*HandleDeregister)(Handle);
  Error (*BufRegister)(const void*, size_t, int);
  Error (*BufDeregister)(const void*);
  ssize_t (*Read)(Handle, void*, size_t, off_t, off_t);
  ssize_t (*Write)(Handle, const void*, size_t, off_t, off_t);
};

// Opens libcufile (`path`, else libcufile.so.0 from the loader's paths) and the cuFile
// driver, once; later calls return the first outcome. Never throws; thread safe.
bool load(const std::string& path = "") noexcept;
bool available() noexcept;
std::string load_error();

// The table; throws CudaError when load() failed.
const Api& api();

// Throws CudaError("call", "CU_FILE_...") unless e.err is success.
void check(Error e, const char* call);

// A file registered with cuFile for the lifetime of the object. `fd` should be opened
// with O_DIRECT. Throws CudaError when the file system or the file cannot be used.
class FileHandle {
 public:
  FileHandle(int fd, const std::string& path);
  ~FileHandle();
  FileHandle(const FileHandle&) = delete;
  FileHandle& operator=(const FileHandle&) = delete;
  Handle get() const noexcept { return handle_; }

 private:
  Handle handle_ = nullptr;
};

// Device buffers registered with cuFileBufRegister for the lifetime of the object, so
// that cuFile moves their bytes directly rather than through its own bounce buffers;
// every one is deregistered by the destructor, on every exit path.
class BufferRegistrations {
 public:
  BufferRegistrations() = default;
  ~BufferRegistrations();
  BufferRegistrations(const BufferRegistrations&) = delete;
  BufferRegistrations& operator=(const BufferRegistrations&) = delete;
  // Registers [base, base + nbytes); false (and nothing to undo) when cuFile refuses,
  // e.g. out of BAR space: the buffer then still works, unregistered. Throws
  // std::bad_alloc only.
  bool add(const void* base, size_t nbytes);
  size_t size() const noexcept { return registered_.size(); }

 private:
  std::vector<const void*> registered_;
};

// Reads/writes exactly nbytes between the file and device memory at dev_base +
// dev_offset, retrying short transfers; throws IoError/CudaError/FormatError (end of
// file) naming `path`.
void read_full(const FileHandle& fh, void* dev_base, size_t nbytes, uint64_t file_offset, uint64_t dev_offset,
               const std::string& path);
void write_full(const FileHandle& fh, const void* dev_base, size_t nbytes, uint64_t file_offset, uint64_t dev_offset,
                const std::string& path);

}  // namespace tensorfile::cufile
