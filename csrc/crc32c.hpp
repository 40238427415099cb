// CRC32C (Castagnoli), hardware-accelerated where the CPU has it, with a combine step so
// that chunks checksummed on different threads fold into one value per storage.
#pragma once

#include <cstddef>
#include <cstdint>

namespace tensorfile {

// Standard CRC32C of `nbytes` bytes, continuing from `crc` (0 for a fresh checksum).
// Thread safe; uses SSE4.2 with three interleaved streams when available.
uint32_t crc32c(const void* data, size_t nbytes, uint32_t crc = 0) noexcept;

// Copies `nbytes` bytes from `src` to `dst` (not overlapping) and returns the CRC32C of
// the bytes copied, continuing from `crc`: each byte is read from `src` once, so the
// checksum is of exactly what `dst` received even if `src` changes meanwhile (another
// thread writing it). One pass instead of a copy and a checksum. Thread safe.
uint32_t crc32c_copy(void* dst, const void* src, size_t nbytes, uint32_t crc = 0) noexcept;

// The portable table-driven implementation, exposed so tests can compare the two.
uint32_t crc32c_software(const void* data, size_t nbytes, uint32_t crc = 0) noexcept;

// CRC32C of A||B given crc(A), crc(B) and the length of B.
uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, size_t nbytes_b) noexcept;

// True when the hardware path is in use.
bool crc32c_hardware() noexcept;

}  // namespace tensorfile
