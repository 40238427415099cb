// CRC-32 (zip): slicing-by-8 for any CPU; on x86-64 with PCLMULQDQ, four 128-bit lanes
// folded 64 bytes at a time and reduced by Barrett's method, after Intel's "Fast CRC
// Computation for Generic Polynomials Using PCLMULQDQ Instruction" (Gopal et al., 2009),
// with that paper's constants for the bit-reflected 0xEDB88320 polynomial.
#include "crc32.hpp"

#include "crc_tables.hpp"

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#include <smmintrin.h>
#include <wmmintrin.h>
#define TENSORFILE_X86 1
#endif

namespace tensorfile {
namespace {

using Tables = detail::CrcTables<0xedb88320u>;

#ifdef TENSORFILE_X86
// Folds `nbytes` (a multiple of 16, at least 64) into the raw CRC state `crc`.
__attribute__((target("sse4.1,pclmul"))) uint32_t fold_pclmul(const uint8_t* p, size_t nbytes, uint32_t crc) noexcept {
  alignas(16) static const uint64_t k1k2[] = {0x0154442bd4ull, 0x01c6e41596ull};
  alignas(16) static const uint64_t k3k4[] = {0x01751997d0ull, 0x00ccaa009eull};
  alignas(16) static const uint64_t k5k0[] = {0x0163cd6124ull, 0x0000000000ull};
  alignas(16) static const uint64_t poly[] = {0x01db710641ull, 0x01f7011641ull};

  __m128i x1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 0x00));
  __m128i x2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 0x10));
  __m128i x3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 0x20));
  __m128i x4 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 0x30));
  x1 = _mm_xor_si128(x1, _mm_cvtsi32_si128(static_cast<int>(crc)));
  __m128i x0 = _mm_load_si128(reinterpret_cast<const __m128i*>(k1k2));
  p += 64;
  nbytes -= 64;

  while (nbytes >= 64) {  // four independent lanes, each folded forward by 512 bits
    __m128i x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    __m128i x6 = _mm_clmulepi64_si128(x2, x0, 0x00);
    __m128i x7 = _mm_clmulepi64_si128(x3, x0, 0x00);
    __m128i x8 = _mm_clmulepi64_si128(x4, x0, 0x00);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
    x2 = _mm_clmulepi64_si128(x2, x0, 0x11);
    x3 = _mm_clmulepi64_si128(x3, x0, 0x11);
    x4 = _mm_clmulepi64_si128(x4, x0, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, x5), _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 0x00)));
    x2 = _mm_xor_si128(_mm_xor_si128(x2, x6), _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 0x10)));
    x3 = _mm_xor_si128(_mm_xor_si128(x3, x7), _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 0x20)));
    x4 = _mm_xor_si128(_mm_xor_si128(x4, x8), _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 0x30)));
    p += 64;
    nbytes -= 64;
  }

  // Fold the four lanes into one (by 128 bits each step).
  x0 = _mm_load_si128(reinterpret_cast<const __m128i*>(k3k4));
  const __m128i lanes[3] = {x2, x3, x4};
  for (const __m128i& next : lanes) {
    __m128i x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, next), x5);
  }
  while (nbytes >= 16) {
    __m128i x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), x5);
    p += 16;
    nbytes -= 16;
  }

  // 128 -> 64 bits.
  __m128i x2b = _mm_clmulepi64_si128(x1, x0, 0x10);
  const __m128i mask32 = _mm_setr_epi32(~0, 0, ~0, 0);
  x1 = _mm_xor_si128(_mm_srli_si128(x1, 8), x2b);
  x0 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(k5k0));
  x2b = _mm_srli_si128(x1, 4);
  x1 = _mm_and_si128(x1, mask32);
  x1 = _mm_clmulepi64_si128(x1, x0, 0x00);
  x1 = _mm_xor_si128(x1, x2b);

  // Barrett reduction to 32 bits.
  x0 = _mm_load_si128(reinterpret_cast<const __m128i*>(poly));
  x2b = _mm_and_si128(x1, mask32);
  x2b = _mm_clmulepi64_si128(x2b, x0, 0x10);
  x2b = _mm_and_si128(x2b, mask32);
  x2b = _mm_clmulepi64_si128(x2b, x0, 0x00);
  x1 = _mm_xor_si128(x1, x2b);
  return static_cast<uint32_t>(_mm_extract_epi32(x1, 1));
}

bool detect_hw() noexcept { return __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1"); }
#else
bool detect_hw() noexcept { return false; }
#endif

const bool kHardware = detect_hw();

}  // namespace

uint32_t crc32_zip_software(const void* data, size_t nbytes, uint32_t crc) noexcept {
  return ~Tables::get().update(~crc, static_cast<const uint8_t*>(data), nbytes);
}

uint32_t crc32_zip(const void* data, size_t nbytes, uint32_t crc) noexcept {
  const auto* p = static_cast<const uint8_t*>(data);
  uint32_t state = ~crc;
#ifdef TENSORFILE_X86
  if (kHardware && nbytes >= 64) {
    size_t bulk = nbytes & ~size_t{15};
    state = fold_pclmul(p, bulk, state);
    p += bulk;
    nbytes -= bulk;
  }
#endif
  return ~Tables::get().update(state, p, nbytes);
}

uint32_t crc32_zip_combine(uint32_t crc_a, uint32_t crc_b, size_t nbytes_b) noexcept {
  return Tables::multmodp(Tables::get().x8nmodp(nbytes_b), crc_a) ^ crc_b;
}

bool crc32_zip_hardware() noexcept { return kHardware; }

}  // namespace tensorfile
