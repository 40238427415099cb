// CRC-32 as zip records carry it (IEEE 802.3, reflected 0xEDB88320), folded with
// carry-less multiplication where the CPU has it, with a combine step like crc32c's.
#pragma once

#include <cstddef>
#include <cstdint>

namespace tensorfile {

// zlib's crc32(crc, data, nbytes): `crc` is 0 for a fresh checksum. Thread safe.
uint32_t crc32_zip(const void* data, size_t nbytes, uint32_t crc = 0) noexcept;

// The portable table-driven implementation, exposed so tests can compare the two.
uint32_t crc32_zip_software(const void* data, size_t nbytes, uint32_t crc = 0) noexcept;

// CRC-32 of A||B given crc(A), crc(B) and the length of B.
uint32_t crc32_zip_combine(uint32_t crc_a, uint32_t crc_b, size_t nbytes_b) noexcept;

// True when the PCLMULQDQ path is in use.
bool crc32_zip_hardware() noexcept;

}  // namespace tensorfile
