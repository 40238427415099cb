// Positioned file I/O that retries short transfers and EINTR, throws IoError with the
// path on failure, and carries the test-only fault-injection hook.
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

// Test hook: make the `countdown`-th following pwrite (1 = the next one) fail with
// `error_number`; countdown 0 disarms. Process-wide; thread safe.
void inject_write_fault(uint64_t countdown, int error_number);

}  // namespace tensorfile

#include <sys/uio.h>

#include <vector>

namespace tensorfile {

// Scatter/gather forms of pread_full/pwrite_full: `iov` is consumed (advanced on short
// transfers). At most IOV_MAX entries.
void preadv_full(int fd, std::vector<iovec>& iov, uint64_t file_offset, const std::string& path);
void pwritev_full(int fd, std::vector<iovec>& iov, uint64_t file_offset, const std::string& path);

}  // namespace tensorfile
