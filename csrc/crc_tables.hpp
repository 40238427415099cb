// Table-driven CRC-32 arithmetic shared by the reflected polynomials tensorfile uses
// (Castagnoli for its own files, IEEE 802.3 for zip records): slicing-by-8 tables and
// GF(2) multiplication, so chunks checksummed on different threads can be combined.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace tensorfile {
namespace detail {

template <uint32_t kPoly>
struct CrcTables {
  uint32_t slice[8][256];
  uint32_t x2n[32];  // x^(2^k) mod P

  CrcTables() {
    for (uint32_t n = 0; n < 256; n++) {
      uint32_t c = n;
      for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ kPoly : c >> 1;
      slice[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++) {
      for (int k = 1; k < 8; k++) slice[k][n] = (slice[k - 1][n] >> 8) ^ slice[0][slice[k - 1][n] & 0xff];
    }
    uint32_t p = 1u << 30;  // x^1
    x2n[0] = p;
    for (int k = 1; k < 32; k++) x2n[k] = p = multmodp(p, p);
  }

  // a * b mod P in the reflected representation (zlib's multmodp).
  static uint32_t multmodp(uint32_t a, uint32_t b) noexcept {
    uint32_t m = 1u << 31, p = 0;
    for (;;) {
      if (a & m) {
        p ^= b;
        if ((a & (m - 1)) == 0) break;
      }
      m >>= 1;
      b = (b & 1) ? (b >> 1) ^ kPoly : b >> 1;
    }
    return p;
  }

  // x^(8n) mod P
  uint32_t x8nmodp(size_t n) const noexcept {
    uint32_t p = 1u << 31;  // x^0
    int k = 3;
    while (n) {
      if (n & 1) p = multmodp(x2n[k & 31], p);
      n >>= 1;
      k++;
    }
    return p;
  }

  // Raw (unconditioned) CRC state update, portable.
  uint32_t update(uint32_t crc, const uint8_t* p, size_t n) const noexcept {
    while (n && (reinterpret_cast<uintptr_t>(p) & 7)) {
      crc = (crc >> 8) ^ slice[0][(crc ^ *p++) & 0xff];
      n--;
    }
    while (n >= 8) {
      uint64_t w;
      std::memcpy(&w, p, 8);
      w ^= crc;
      crc = slice[7][w & 0xff] ^ slice[6][(w >> 8) & 0xff] ^ slice[5][(w >> 16) & 0xff] ^ slice[4][(w >> 24) & 0xff] ^
            slice[3][(w >> 32) & 0xff] ^ slice[2][(w >> 40) & 0xff] ^ slice[1][(w >> 48) & 0xff] ^ slice[0][w >> 56];
      p += 8;
      n -= 8;
    }
    while (n--) crc = (crc >> 8) ^ slice[0][(crc ^ *p++) & 0xff];
    return crc;
  }

  static const CrcTables& get() {
    static const CrcTables t;
    return t;
  }
};

}  // namespace detail
}  // namespace tensorfile
