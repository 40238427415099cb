// CRC32C: slicing-by-8 tables for any CPU, SSE4.2 crc32 instructions on three
// interleaved lanes for x86-64 (the instruction's latency is three cycles, so three
// independent lanes keep the unit busy), joined with GF(2) polynomial shifts.
#include "crc32c.hpp"

#include <cstring>

#include "crc_tables.hpp"

#if defined(__x86_64__) || defined(_M_X64)
#include <nmmintrin.h>
#define TENSORFILE_X86 1
#endif

namespace tensorfile {
namespace {

using Tables = detail::CrcTables<0x82f63b78u>;  // reflected Castagnoli polynomial

const Tables& tables() { return Tables::get(); }

uint32_t raw_software(uint32_t crc, const uint8_t* p, size_t n) noexcept { return tables().update(crc, p, n); }

#ifdef TENSORFILE_X86
constexpr size_t kLane = 8192;  // bytes per lane in the three-lane loop

__attribute__((target("sse4.2"))) uint32_t raw_hw_serial(uint32_t crc, const uint8_t* p, size_t n) noexcept {
  while (n && (reinterpret_cast<uintptr_t>(p) & 7)) {
    crc = _mm_crc32_u8(crc, *p++);
    n--;
  }
  uint64_t c = crc;
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    c = _mm_crc32_u64(c, w);
    p += 8;
    n -= 8;
  }
  crc = static_cast<uint32_t>(c);
  while (n--) crc = _mm_crc32_u8(crc, *p++);
  return crc;
}

__attribute__((target("sse4.2"))) uint32_t raw_hw(uint32_t crc, const uint8_t* p, size_t n) noexcept {
  static const uint32_t shift_lane = tables().x8nmodp(kLane);
  while (n && (reinterpret_cast<uintptr_t>(p) & 7)) {
    crc = _mm_crc32_u8(crc, *p++);
    n--;
  }
  while (n >= 3 * kLane) {
    uint64_t c0 = crc, c1 = 0, c2 = 0;
    const uint8_t* p1 = p + kLane;
    const uint8_t* p2 = p + 2 * kLane;
    for (size_t i = 0; i < kLane; i += 8) {
      uint64_t w0, w1, w2;
      std::memcpy(&w0, p + i, 8);
      std::memcpy(&w1, p1 + i, 8);
      std::memcpy(&w2, p2 + i, 8);
      c0 = _mm_crc32_u64(c0, w0);
      c1 = _mm_crc32_u64(c1, w1);
      c2 = _mm_crc32_u64(c2, w2);
    }
    // state(A||B) = state(A) * x^(8|B|) xor state_from_zero(B)
    uint32_t s = Tables::multmodp(shift_lane, static_cast<uint32_t>(c0)) ^ static_cast<uint32_t>(c1);
    crc = Tables::multmodp(shift_lane, s) ^ static_cast<uint32_t>(c2);
    p += 3 * kLane;
    n -= 3 * kLane;
  }
  return raw_hw_serial(crc, p, n);
}

// Makes `w` opaque to the optimizer, so that the value checksummed and the value stored
// are one load of the source: without it the compiler may copy with a load of its own
// (it assumes no other thread writes the source), and the two could differ.
inline void pin(uint64_t& w) noexcept { asm volatile("" : "+r"(w)); }

__attribute__((target("sse4.2"))) uint32_t raw_hw_copy(uint32_t crc, uint8_t* d, const uint8_t* p, size_t n) noexcept {
  static const uint32_t shift_lane = tables().x8nmodp(kLane);
  while (n && (reinterpret_cast<uintptr_t>(p) & 7)) {
    const uint8_t b = *p++;
    crc = _mm_crc32_u8(crc, b);
    *d++ = b;
    n--;
  }
  while (n >= 3 * kLane) {
    uint64_t c0 = crc, c1 = 0, c2 = 0;
    for (size_t i = 0; i < kLane; i += 8) {
      uint64_t w0, w1, w2;
      std::memcpy(&w0, p + i, 8);
      std::memcpy(&w1, p + kLane + i, 8);
      std::memcpy(&w2, p + 2 * kLane + i, 8);
      pin(w0);
      pin(w1);
      pin(w2);
      c0 = _mm_crc32_u64(c0, w0);
      c1 = _mm_crc32_u64(c1, w1);
      c2 = _mm_crc32_u64(c2, w2);
      std::memcpy(d + i, &w0, 8);
      std::memcpy(d + kLane + i, &w1, 8);
      std::memcpy(d + 2 * kLane + i, &w2, 8);
    }
    uint32_t s = Tables::multmodp(shift_lane, static_cast<uint32_t>(c0)) ^ static_cast<uint32_t>(c1);
    crc = Tables::multmodp(shift_lane, s) ^ static_cast<uint32_t>(c2);
    p += 3 * kLane;
    d += 3 * kLane;
    n -= 3 * kLane;
  }
  uint64_t c = crc;
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    pin(w);
    c = _mm_crc32_u64(c, w);
    std::memcpy(d, &w, 8);
    p += 8;
    d += 8;
    n -= 8;
  }
  crc = static_cast<uint32_t>(c);
  while (n--) {
    const uint8_t b = *p++;
    crc = _mm_crc32_u8(crc, b);
    *d++ = b;
  }
  return crc;
}

bool detect_hw() noexcept { return __builtin_cpu_supports("sse4.2"); }
#else
bool detect_hw() noexcept { return false; }
#endif

const bool kHardware = detect_hw();

}  // namespace

uint32_t crc32c_software(const void* data, size_t nbytes, uint32_t crc) noexcept {
  return ~raw_software(~crc, static_cast<const uint8_t*>(data), nbytes);
}

uint32_t crc32c(const void* data, size_t nbytes, uint32_t crc) noexcept {
#ifdef TENSORFILE_X86
  if (kHardware) return ~raw_hw(~crc, static_cast<const uint8_t*>(data), nbytes);
#endif
  return crc32c_software(data, nbytes, crc);
}

uint32_t crc32c_copy(void* dst, const void* src, size_t nbytes, uint32_t crc) noexcept {
#ifdef TENSORFILE_X86
  if (kHardware) return ~raw_hw_copy(~crc, static_cast<uint8_t*>(dst), static_cast<const uint8_t*>(src), nbytes);
#endif
  // Copy first, then checksum the copy: the checksum is of what dst holds.
  std::memcpy(dst, src, nbytes);
  return crc32c_software(dst, nbytes, crc);
}

uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, size_t nbytes_b) noexcept {
  return Tables::multmodp(tables().x8nmodp(nbytes_b), crc_a) ^ crc_b;
}

bool crc32c_hardware() noexcept { return kHardware; }

}  // namespace tensorfile
