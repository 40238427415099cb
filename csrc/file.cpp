// pread/pwrite loops with errno-carrying errors (see file.hpp).
#include "file.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>

#include "errors.hpp"

namespace tensorfile {

namespace {
std::atomic<WriteHook> g_write_hook{nullptr};

[[noreturn]] void throw_io(int err, const std::string& verb, const std::string& path, uint64_t offset) {
  throw IoError(
      err, path,
      std::string(std::strerror(err)) + " while " + verb + " " + path + " at offset " + std::to_string(offset));
}
}  // namespace

void set_write_hook(WriteHook hook) noexcept { g_write_hook.store(hook); }

namespace {
// Drops `done` bytes from the front of iov[first..]; returns the new first index.
size_t advance(std::vector<iovec>& iov, size_t first, size_t done) {
  while (done > 0) {
    if (done >= iov[first].iov_len) {
      done -= iov[first].iov_len;
      first++;
    } else {
      iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + done;
      iov[first].iov_len -= done;
      done = 0;
    }
  }
  while (first < iov.size() && iov[first].iov_len == 0) first++;
  return first;
}
}  // namespace

void preadv_full(int fd, std::vector<iovec>& iov, uint64_t file_offset, const std::string& path) {
  size_t first = advance(iov, 0, 0);
  while (first < iov.size()) {
    ssize_t got =
        ::preadv(fd, iov.data() + first, static_cast<int>(iov.size() - first), static_cast<off_t>(file_offset));
    if (got < 0) {
      if (errno == EINTR) continue;
      throw_io(errno, "reading", path, file_offset);
    }
    if (got == 0) {
      throw FormatError(path + ": unexpected end of file at offset " + std::to_string(file_offset) +
                        " (the file is truncated or was changed while being read)");
    }
    file_offset += static_cast<uint64_t>(got);
    first = advance(iov, first, static_cast<size_t>(got));
  }
}

void pwritev_full(int fd, std::vector<iovec>& iov, uint64_t file_offset, const std::string& path) {
  if (WriteHook hook = g_write_hook.load(std::memory_order_relaxed)) {
    if (int err = hook()) throw_io(err, "writing", path, file_offset);
  }
  size_t first = advance(iov, 0, 0);
  while (first < iov.size()) {
    ssize_t put =
        ::pwritev(fd, iov.data() + first, static_cast<int>(iov.size() - first), static_cast<off_t>(file_offset));
    if (put < 0) {
      if (errno == EINTR) continue;
      throw_io(errno, "writing", path, file_offset);
    }
    if (put == 0) throw_io(ENOSPC, "writing", path, file_offset);
    file_offset += static_cast<uint64_t>(put);
    first = advance(iov, first, static_cast<size_t>(put));
  }
}

void pread_full(int fd, void* dst, size_t nbytes, uint64_t file_offset, const std::string& path) {
  std::vector<iovec> iov{{dst, nbytes}};
  preadv_full(fd, iov, file_offset, path);
}

void pwrite_full(int fd, const void* src, size_t nbytes, uint64_t file_offset, const std::string& path) {
  std::vector<iovec> iov{{const_cast<void*>(src), nbytes}};
  pwritev_full(fd, iov, file_offset, path);
}

void preallocate(int fd, uint64_t nbytes, const std::string& path) {
  if (nbytes == 0) return;
#ifdef __linux__
  // fallocate, not posix_fallocate: glibc's fallback for the latter writes zeros
  // through the whole file, doubling the bytes written on file systems without it.
  while (::fallocate(fd, 0, 0, static_cast<off_t>(nbytes)) != 0) {
    if (errno == EINTR) continue;
    if (errno == EOPNOTSUPP || errno == ENOSYS || errno == EINVAL) return;
    throw_io(errno, "reserving space for", path, 0);
  }
#else
  (void)fd;
  (void)path;
#endif
}

}  // namespace tensorfile
