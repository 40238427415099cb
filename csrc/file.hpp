// Positioned file I/O that retries short transfers and EINTR and throws IoError with the
// path on failure, with a hook before every write where failures can be injected.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace tensorfile {

// Reads exactly nbytes at file_offset; an early end of file is a FormatError
// ("truncated"), any other failure an IoError naming `path`.
void pread_full(int fd, void* dst, size_t nbytes, uint64_t file_offset, const std::string& path);

// Writes exactly nbytes at file_offset, or throws IoError naming `path`.
void pwrite_full(int fd, const void* src, size_t nbytes, uint64_t file_offset, const std::string& path);

// Reserves nbytes of disk for fd so that a full disk fails before any data is written.
// File systems without fallocate are accepted silently.
void preallocate(int fd, uint64_t nbytes, const std::string& path);

// Called before every write this file's functions make: returns 0 to let the write go
// ahead, or an errno value to fail it as the system would have. Process-wide, nullptr
// (the default) for none; thread safe. Fault injection (testing/) installs one.
using WriteHook = int (*)() noexcept;
void set_write_hook(WriteHook hook) noexcept;

}  // namespace tensorfile

#include <sys/uio.h>

#include <vector>

namespace tensorfile {

// Scatter/gather forms of pread_full/pwrite_full: `iov` is consumed (advanced on short
// transfers). At most IOV_MAX entries.
void preadv_full(int fd, std::vector<iovec>& iov, uint64_t file_offset, const std::string& path);
void pwritev_full(int fd, std::vector<iovec>& iov, uint64_t file_offset, const std::string& path);

}  // namespace tensorfile
