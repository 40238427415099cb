// XXH3-128: the short (0-16 bytes), medium (17-240) and long (241+) algorithms of the
// xxHash specification, with the long input's stripe loop in a scalar kernel for any CPU
// and SSE2 / AVX2 / AVX-512 kernels for x86-64 (the wider ones chosen at run time, so the
// build needs no -march flag).
#include "xxh3.hpp"

#include <algorithm>
#include <cstring>
#include <stdexcept>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define TENSORFILE_X86 1
#endif

namespace tensorfile {
namespace {

constexpr uint64_t kPrime32_1 = 0x9E3779B1u;
constexpr uint64_t kPrime32_2 = 0x85EBCA77u;
constexpr uint64_t kPrime32_3 = 0xC2B2AE3Du;
constexpr uint64_t kPrime64_1 = 0x9E3779B185EBCA87ull;
constexpr uint64_t kPrime64_2 = 0xC2B2AE3D27D4EB4Full;
constexpr uint64_t kPrime64_3 = 0x165667B19E3779F9ull;
constexpr uint64_t kPrime64_4 = 0x85EBCA77C2B2AE63ull;
constexpr uint64_t kPrime64_5 = 0x27D4EB2F165667C5ull;
constexpr uint64_t kPrimeMx1 = 0x165667919E3779F9ull;
constexpr uint64_t kPrimeMx2 = 0x9FB21C651E98DF25ull;

constexpr size_t kSecretNbytes = 192;
constexpr size_t kStripeNbytes = 64;
constexpr size_t kStripesPerBlock = (kSecretNbytes - kStripeNbytes) / 8;  // 16
constexpr size_t kBlockNbytes = kStripeNbytes * kStripesPerBlock;         // 1024
constexpr size_t kMidMaxNbytes = 240;

// The specification's default secret ("Seed and Secret"); read little-endian throughout.
alignas(64) constexpr uint8_t kSecret[kSecretNbytes] = {
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c, 0xde, 0xd4,
    0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f, 0xcb, 0x79, 0xe6, 0x4e,
    0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21, 0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43,
    0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c, 0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb,
    0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3, 0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19,
    0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8, 0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7,
    0xc7, 0x0b, 0x4f, 0x1d, 0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78,
    0x73, 0x64, 0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e, 0x2b, 0x16,
    0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce, 0x45, 0xcb, 0x3a, 0x8f,
    0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
};

// Where the long algorithm reads the secret: the scramble takes its last 64 bytes, the
// final stripe starts 7 bytes before them, the two merges at 11 and 11 bytes before.
constexpr size_t kScrambleOffset = kSecretNbytes - kStripeNbytes;        // 128
constexpr size_t kLastStripeOffset = kSecretNbytes - kStripeNbytes - 7;  // 121
constexpr size_t kMergeHighOffset = kSecretNbytes - kStripeNbytes - 11;  // 117

constexpr bool kBigEndian = __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__;

inline uint32_t read32(const uint8_t* p) noexcept {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return kBigEndian ? __builtin_bswap32(v) : v;
}

inline uint64_t read64(const uint8_t* p) noexcept {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return kBigEndian ? __builtin_bswap64(v) : v;
}

inline uint32_t rotl32(uint32_t x, int r) noexcept { return (x << r) | (x >> (32 - r)); }

struct U128 {
  uint64_t low, high;
};

inline U128 mul128(uint64_t a, uint64_t b) noexcept {
#if defined(__SIZEOF_INT128__)
  const unsigned __int128 m = static_cast<unsigned __int128>(a) * b;
  return {static_cast<uint64_t>(m), static_cast<uint64_t>(m >> 64)};
#else
  const uint64_t lo_lo = (a & 0xFFFFFFFF) * (b & 0xFFFFFFFF);
  const uint64_t hi_lo = (a >> 32) * (b & 0xFFFFFFFF);
  const uint64_t lo_hi = (a & 0xFFFFFFFF) * (b >> 32);
  const uint64_t hi_hi = (a >> 32) * (b >> 32);
  const uint64_t cross = (lo_lo >> 32) + (hi_lo & 0xFFFFFFFF) + lo_hi;
  return {(cross << 32) | (lo_lo & 0xFFFFFFFF), (hi_lo >> 32) + (cross >> 32) + hi_hi};
#endif
}

inline uint64_t mul128_fold64(uint64_t a, uint64_t b) noexcept {
  const U128 m = mul128(a, b);
  return m.low ^ m.high;
}

// The two final mixes of "Final Mixing Step (avalanche)".
inline uint64_t avalanche(uint64_t x) noexcept {
  x ^= x >> 37;
  x *= kPrimeMx1;
  return x ^ (x >> 32);
}

inline uint64_t avalanche_xxh64(uint64_t x) noexcept {
  x ^= x >> 33;
  x *= kPrime64_2;
  x ^= x >> 29;
  x *= kPrime64_3;
  return x ^ (x >> 32);
}

// ------------------------------------------------------------------ short and medium inputs

U128 hash_0(uint64_t seed) noexcept {
  return {avalanche_xxh64(seed ^ read64(kSecret + 64) ^ read64(kSecret + 72)),
          avalanche_xxh64(seed ^ read64(kSecret + 80) ^ read64(kSecret + 88))};
}

U128 hash_1to3(const uint8_t* p, size_t n, uint64_t seed) noexcept {
  const uint32_t combined = static_cast<uint32_t>(p[n - 1]) | (static_cast<uint32_t>(n) << 8) |
                            (static_cast<uint32_t>(p[0]) << 16) | (static_cast<uint32_t>(p[n >> 1]) << 24);
  const uint64_t low = (static_cast<uint64_t>(read32(kSecret) ^ read32(kSecret + 4)) + seed) ^ combined;
  const uint64_t high = (static_cast<uint64_t>(read32(kSecret + 8) ^ read32(kSecret + 12)) - seed) ^
                        rotl32(__builtin_bswap32(combined), 13);
  return {avalanche_xxh64(low), avalanche_xxh64(high)};
}

U128 hash_4to8(const uint8_t* p, size_t n, uint64_t seed) noexcept {
  seed ^= static_cast<uint64_t>(__builtin_bswap32(static_cast<uint32_t>(seed))) << 32;
  const uint64_t combined = read32(p) | (static_cast<uint64_t>(read32(p + n - 4)) << 32);
  const uint64_t value = ((read64(kSecret + 16) ^ read64(kSecret + 24)) + seed) ^ combined;
  U128 m = mul128(value, kPrime64_1 + (static_cast<uint64_t>(n) << 2));
  m.high += m.low << 1;
  m.low ^= m.high >> 3;
  m.low ^= m.low >> 35;
  m.low *= kPrimeMx2;
  m.low ^= m.low >> 28;
  return {m.low, avalanche(m.high)};
}

U128 hash_9to16(const uint8_t* p, size_t n, uint64_t seed) noexcept {
  const uint64_t first = read64(p);
  const uint64_t last = read64(p + n - 8);
  const uint64_t val1 = ((read64(kSecret + 32) ^ read64(kSecret + 40)) - seed) ^ first ^ last;
  const uint64_t val2 = ((read64(kSecret + 48) ^ read64(kSecret + 56)) + seed) ^ last;
  U128 m = mul128(val1, kPrime64_1);
  m.low += static_cast<uint64_t>(n - 1) << 54;
  m.high += val2 + (val2 & 0xFFFFFFFF) * (kPrime32_2 - 1);
  m.low ^= __builtin_bswap64(m.high);
  // {low, high} * PRIME64_2 as a 128x64 -> 128 multiplication.
  U128 h = mul128(m.low, kPrime64_2);
  h.high += m.high * kPrime64_2;
  return {avalanche(h.low), avalanche(h.high)};
}

inline uint64_t mix16(const uint8_t* p, const uint8_t* secret, uint64_t seed) noexcept {
  return mul128_fold64(read64(p) ^ (read64(secret) + seed), read64(p + 8) ^ (read64(secret + 8) - seed));
}

// The specification's mixTwoChunks.
inline void mix32(uint64_t acc[2], const uint8_t* a, const uint8_t* b, const uint8_t* secret, uint64_t seed) noexcept {
  acc[0] += mix16(a, secret, seed);
  acc[0] ^= read64(b) + read64(b + 8);
  acc[1] += mix16(b, secret + 16, seed);
  acc[1] ^= read64(a) + read64(a + 8);
}

U128 finish_mid(const uint64_t acc[2], size_t n, uint64_t seed) noexcept {
  const uint64_t low = acc[0] + acc[1];
  const uint64_t high = acc[0] * kPrime64_1 + acc[1] * kPrime64_4 + (static_cast<uint64_t>(n) - seed) * kPrime64_2;
  return {avalanche(low), uint64_t{0} - avalanche(high)};
}

U128 hash_17to128(const uint8_t* p, size_t n, uint64_t seed) noexcept {
  uint64_t acc[2] = {static_cast<uint64_t>(n) * kPrime64_1, 0};
  // Chunks from both ends, innermost pair first, until they cover the input.
  for (size_t i = ((n - 1) >> 5) + 1; i-- > 0;) mix32(acc, p + 16 * i, p + n - 16 * i - 16, kSecret + 32 * i, seed);
  return finish_mid(acc, n, seed);
}

U128 hash_129to240(const uint8_t* p, size_t n, uint64_t seed) noexcept {
  uint64_t acc[2] = {static_cast<uint64_t>(n) * kPrime64_1, 0};
  for (size_t i = 0; i < 4; i++) mix32(acc, p + 32 * i, p + 32 * i + 16, kSecret + 32 * i, seed);
  acc[0] = avalanche(acc[0]);
  acc[1] = avalanche(acc[1]);
  const size_t nchunks = n >> 5;
  for (size_t i = 4; i < nchunks; i++) mix32(acc, p + 32 * i, p + 32 * i + 16, kSecret + 32 * (i - 4) + 3, seed);
  // The last 32 bytes with their halves swapped and the seed negated, as the spec has it.
  mix32(acc, p + n - 16, p + n - 32, kSecret + 103, uint64_t{0} - seed);
  return finish_mid(acc, n, seed);
}

U128 hash_short(const uint8_t* p, size_t n) noexcept {
  if (n > 128) return hash_129to240(p, n, 0);
  if (n > 16) return hash_17to128(p, n, 0);
  if (n > 8) return hash_9to16(p, n, 0);
  if (n > 3) return hash_4to8(p, n, 0);
  if (n > 0) return hash_1to3(p, n, 0);
  return hash_0(0);
}

// ------------------------------------------------------------------ long inputs: the kernels

// Stripe n of a block is keyed by secret[8n, 8n + 64). Copied once into rows of 64 bytes,
// aligned, the kernels' key loads never straddle a cache line (at 8-byte steps most
// 32- and 64-byte loads of the secret itself would).
struct StripeKeys {
  alignas(64) uint8_t bytes[kStripesPerBlock * kStripeNbytes];
  constexpr StripeKeys() : bytes() {
    for (size_t n = 0; n < kStripesPerBlock; n++) {
      for (size_t b = 0; b < kStripeNbytes; b++) bytes[n * kStripeNbytes + b] = kSecret[8 * n + b];
    }
  }
};
constexpr StripeKeys kStripeKeys{};

// accumulate: the specification's accumulate() for `nstripes` consecutive stripes, stripe
// s keyed by the 64 bytes at keys + 64 * s (rows of kStripeKeys; any 64 bytes for a single
// stripe); scramble: round_scramble(), keyed by the secret's last 64 bytes; rounds:
// `nblocks` whole rounds (16 stripes, then a scramble) with the accumulators kept in
// registers throughout, which is where a long input spends its time.
struct Kernel {
  void (*accumulate)(uint64_t* acc, const uint8_t* stripes, const uint8_t* keys, size_t nstripes) noexcept;
  void (*scramble)(uint64_t* acc) noexcept;
  void (*rounds)(uint64_t* acc, const uint8_t* blocks, size_t nblocks) noexcept;
};

// Bytes ahead of the stripe being hashed to prefetch, so that a buffer streamed from
// memory arrives before the loop needs it.
constexpr size_t kPrefetchAhead = 384;

void accumulate_scalar(uint64_t* acc, const uint8_t* stripes, const uint8_t* keys, size_t nstripes) noexcept {
  for (size_t s = 0; s < nstripes; s++) {
    const uint8_t* p = stripes + s * kStripeNbytes;
    const uint8_t* k = keys + s * kStripeNbytes;
    for (size_t i = 0; i < 8; i++) {
      const uint64_t data = read64(p + 8 * i);
      const uint64_t value = data ^ read64(k + 8 * i);
      acc[i ^ 1] += data;
      acc[i] += (value & 0xFFFFFFFF) * (value >> 32);
    }
  }
}

void scramble_scalar(uint64_t* acc) noexcept {
  for (size_t i = 0; i < 8; i++) {
    uint64_t a = acc[i];
    a ^= a >> 47;
    a ^= read64(kSecret + kScrambleOffset + 8 * i);
    acc[i] = a * kPrime32_1;
  }
}

void rounds_scalar(uint64_t* acc, const uint8_t* blocks, size_t nblocks) noexcept {
  for (size_t b = 0; b < nblocks; b++) {
    accumulate_scalar(acc, blocks + b * kBlockNbytes, kStripeKeys.bytes, kStripesPerBlock);
    scramble_scalar(acc);
  }
}

#ifdef TENSORFILE_X86
#define TENSORFILE_INLINE_FOR(isa) inline __attribute__((always_inline, target(isa)))

// Two lanes per register: _mm_mul_epu32 is exactly lowerHalf * higherHalf once the high
// halves are shifted down (a shift, not a shuffle: the swap below already takes the
// shuffle port), and swapping the 64-bit halves adds stripe[i] to acc[i ^ 1].
struct Sse2 {
  __m128i a[4];

  TENSORFILE_INLINE_FOR("sse2") void load(const uint64_t* acc) {
    for (int i = 0; i < 4; i++) a[i] = _mm_load_si128(reinterpret_cast<const __m128i*>(acc) + i);
  }
  TENSORFILE_INLINE_FOR("sse2") void store(uint64_t* acc) const {
    for (int i = 0; i < 4; i++) _mm_store_si128(reinterpret_cast<__m128i*>(acc) + i, a[i]);
  }
  TENSORFILE_INLINE_FOR("sse2") void stripes(const uint8_t* stripes, const uint8_t* keys, size_t nstripes) {
    for (size_t s = 0; s < nstripes; s++) {
      const uint8_t* p = stripes + s * kStripeNbytes;
      _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchAhead), _MM_HINT_T0);
      const __m128i* k = reinterpret_cast<const __m128i*>(keys + s * kStripeNbytes);
      for (int i = 0; i < 4; i++) {
        const __m128i data = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p) + i);
        const __m128i value = _mm_xor_si128(data, _mm_loadu_si128(k + i));
        const __m128i product = _mm_mul_epu32(value, _mm_srli_epi64(value, 32));
        const __m128i swapped = _mm_shuffle_epi32(data, _MM_SHUFFLE(1, 0, 3, 2));
        a[i] = _mm_add_epi64(a[i], _mm_add_epi64(product, swapped));
      }
    }
  }
  TENSORFILE_INLINE_FOR("sse2") void scramble() {
    const __m128i prime = _mm_set1_epi32(static_cast<int>(kPrime32_1));
    for (int i = 0; i < 4; i++) {
      __m128i x = _mm_xor_si128(a[i], _mm_srli_epi64(a[i], 47));
      x = _mm_xor_si128(x, _mm_load_si128(reinterpret_cast<const __m128i*>(kSecret + kScrambleOffset) + i));
      // x * PRIME32_1 in 64 bits, from two 32x32 -> 64 products.
      const __m128i low = _mm_mul_epu32(x, prime);
      const __m128i high = _mm_mul_epu32(_mm_shuffle_epi32(x, _MM_SHUFFLE(0, 3, 0, 1)), prime);
      a[i] = _mm_add_epi64(low, _mm_slli_epi64(high, 32));
    }
  }
};

// The same with four lanes per register (the shuffles work within each 128-bit half).
struct Avx2 {
  __m256i a[2];

  TENSORFILE_INLINE_FOR("avx2") void load(const uint64_t* acc) {
    for (int i = 0; i < 2; i++) a[i] = _mm256_load_si256(reinterpret_cast<const __m256i*>(acc) + i);
  }
  TENSORFILE_INLINE_FOR("avx2") void store(uint64_t* acc) const {
    for (int i = 0; i < 2; i++) _mm256_store_si256(reinterpret_cast<__m256i*>(acc) + i, a[i]);
  }
  TENSORFILE_INLINE_FOR("avx2") void stripes(const uint8_t* stripes, const uint8_t* keys, size_t nstripes) {
    for (size_t s = 0; s < nstripes; s++) {
      const uint8_t* p = stripes + s * kStripeNbytes;
      _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchAhead), _MM_HINT_T0);
      const __m256i* k = reinterpret_cast<const __m256i*>(keys + s * kStripeNbytes);
      for (int i = 0; i < 2; i++) {
        const __m256i data = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p) + i);
        const __m256i value = _mm256_xor_si256(data, _mm256_loadu_si256(k + i));
        const __m256i product = _mm256_mul_epu32(value, _mm256_srli_epi64(value, 32));
        const __m256i swapped = _mm256_shuffle_epi32(data, _MM_SHUFFLE(1, 0, 3, 2));
        a[i] = _mm256_add_epi64(a[i], _mm256_add_epi64(product, swapped));
      }
    }
  }
  TENSORFILE_INLINE_FOR("avx2") void scramble() {
    const __m256i prime = _mm256_set1_epi32(static_cast<int>(kPrime32_1));
    for (int i = 0; i < 2; i++) {
      __m256i x = _mm256_xor_si256(a[i], _mm256_srli_epi64(a[i], 47));
      x = _mm256_xor_si256(x, _mm256_load_si256(reinterpret_cast<const __m256i*>(kSecret + kScrambleOffset) + i));
      const __m256i low = _mm256_mul_epu32(x, prime);
      const __m256i high = _mm256_mul_epu32(_mm256_shuffle_epi32(x, _MM_SHUFFLE(0, 3, 0, 1)), prime);
      a[i] = _mm256_add_epi64(low, _mm256_slli_epi64(high, 32));
    }
  }
};

// GCC 12's AVX-512 headers warn of their own _mm512_undefined_epi32 (GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// One stripe per register; the scramble's two xors as one ternary-logic op (0x96).
struct Avx512 {
  __m512i a;

  TENSORFILE_INLINE_FOR("avx512f") void load(const uint64_t* acc) { a = _mm512_load_si512(acc); }
  TENSORFILE_INLINE_FOR("avx512f") void store(uint64_t* acc) const { _mm512_store_si512(acc, a); }
  TENSORFILE_INLINE_FOR("avx512f") void stripes(const uint8_t* stripes, const uint8_t* keys, size_t nstripes) {
    for (size_t s = 0; s < nstripes; s++) {
      const uint8_t* p = stripes + s * kStripeNbytes;
      _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchAhead), _MM_HINT_T0);
      const __m512i data = _mm512_loadu_si512(p);
      const __m512i value = _mm512_xor_si512(data, _mm512_loadu_si512(keys + s * kStripeNbytes));
      const __m512i high = _mm512_srli_epi64(value, 32);
      const __m512i swapped = _mm512_shuffle_epi32(data, static_cast<_MM_PERM_ENUM>(_MM_SHUFFLE(1, 0, 3, 2)));
      a = _mm512_add_epi64(a, _mm512_add_epi64(_mm512_mul_epu32(value, high), swapped));
    }
  }
  TENSORFILE_INLINE_FOR("avx512f") void scramble() {
    const __m512i prime = _mm512_set1_epi32(static_cast<int>(kPrime32_1));
    const __m512i x =
        _mm512_ternarylogic_epi64(a, _mm512_srli_epi64(a, 47), _mm512_load_si512(kSecret + kScrambleOffset), 0x96);
    const __m512i low = _mm512_mul_epu32(x, prime);
    const __m512i high =
        _mm512_mul_epu32(_mm512_shuffle_epi32(x, static_cast<_MM_PERM_ENUM>(_MM_SHUFFLE(0, 3, 0, 1))), prime);
    a = _mm512_add_epi64(low, _mm512_slli_epi64(high, 32));
  }
};

// The three entry points of a kernel from its register type, each compiled for its ISA.
#define TENSORFILE_XXH3_KERNEL(Regs, isa)                                                                          \
  __attribute__((target(isa))) void accumulate_##Regs(uint64_t* acc, const uint8_t* stripes, const uint8_t* keys,  \
                                                      size_t nstripes) noexcept {                                  \
    Regs r;                                                                                                        \
    r.load(acc);                                                                                                   \
    r.stripes(stripes, keys, nstripes);                                                                            \
    r.store(acc);                                                                                                  \
  }                                                                                                                \
  __attribute__((target(isa))) void scramble_##Regs(uint64_t* acc) noexcept {                                      \
    Regs r;                                                                                                        \
    r.load(acc);                                                                                                   \
    r.scramble();                                                                                                  \
    r.store(acc);                                                                                                  \
  }                                                                                                                \
  __attribute__((target(isa))) void rounds_##Regs(uint64_t* acc, const uint8_t* blocks, size_t nblocks) noexcept { \
    Regs r;                                                                                                        \
    r.load(acc);                                                                                                   \
    for (size_t b = 0; b < nblocks; b++) {                                                                         \
      r.stripes(blocks + b * kBlockNbytes, kStripeKeys.bytes, kStripesPerBlock);                                   \
      r.scramble();                                                                                                \
    }                                                                                                              \
    r.store(acc);                                                                                                  \
  }                                                                                                                \
  constexpr Kernel k##Regs##Kernel{&accumulate_##Regs, &scramble_##Regs, &rounds_##Regs};

TENSORFILE_XXH3_KERNEL(Sse2, "sse2")
TENSORFILE_XXH3_KERNEL(Avx2, "avx2")
TENSORFILE_XXH3_KERNEL(Avx512, "avx512f")
#undef TENSORFILE_XXH3_KERNEL
#undef TENSORFILE_INLINE_FOR
#pragma GCC diagnostic pop
#endif

constexpr Kernel kScalarKernel{&accumulate_scalar, &scramble_scalar, &rounds_scalar};

std::vector<Xxh3Kernel> detect_kernels() {
  std::vector<Xxh3Kernel> out{Xxh3Kernel::kScalar};
#ifdef TENSORFILE_X86
  out.push_back(Xxh3Kernel::kSse2);
  if (__builtin_cpu_supports("avx2")) out.push_back(Xxh3Kernel::kAvx2);
  // libgcc's check includes the OS saving the zmm registers (XCR0), not only CPUID.
  if (__builtin_cpu_supports("avx512f")) out.push_back(Xxh3Kernel::kAvx512);
#endif
  return out;
}

const std::vector<Xxh3Kernel>& available() {
  static const std::vector<Xxh3Kernel> kernels = detect_kernels();
  return kernels;
}

// kAuto resolved to the fastest kernel; std::invalid_argument for one not available.
Xxh3Kernel resolve(Xxh3Kernel kernel) {
  const auto& kernels = available();
  if (kernel == Xxh3Kernel::kAuto) return kernels.back();
  for (Xxh3Kernel k : kernels) {
    if (k == kernel) return k;
  }
  throw std::invalid_argument(std::string("XXH3 kernel '") + xxh3_kernel_name(kernel) +
                              "' is not available on this CPU or build");
}

const Kernel& kernel_of(Xxh3Kernel kernel) noexcept {
  switch (kernel) {
#ifdef TENSORFILE_X86
    case Xxh3Kernel::kSse2:
      return kSse2Kernel;
    case Xxh3Kernel::kAvx2:
      return kAvx2Kernel;
    case Xxh3Kernel::kAvx512:
      return kAvx512Kernel;
#endif
    default:
      return kScalarKernel;
  }
}

// ------------------------------------------------------------------ long inputs: the algorithm

// The specification's initial accumulators ("Step 1").
inline void init_acc(uint64_t* acc) noexcept {
  const uint64_t init[8] = {kPrime32_3, kPrime64_1, kPrime64_2, kPrime64_3,
                            kPrime64_4, kPrime32_2, kPrime64_5, kPrime32_1};
  std::memcpy(acc, init, sizeof(init));
}

uint64_t merge(const uint64_t* acc, const uint8_t* secret, uint64_t start) noexcept {
  uint64_t result = start;
  for (size_t i = 0; i < 4; i++) {
    result += mul128_fold64(acc[2 * i] ^ read64(secret + 16 * i), acc[2 * i + 1] ^ read64(secret + 16 * i + 8));
  }
  return avalanche(result);
}

U128 finish_long(const uint64_t* acc, uint64_t nbytes) noexcept {
  return {merge(acc, kSecret + 11, nbytes * kPrime64_1),
          merge(acc, kSecret + kMergeHighOffset, ~(nbytes * kPrime64_2))};
}

U128 hash_long(const uint8_t* p, size_t n, const Kernel& k) noexcept {
  alignas(64) uint64_t acc[8];
  init_acc(acc);
  // Every full block but the last is a round; the last (1..1024 bytes) accumulates its
  // stripes but its last, then the input's final 64 bytes are the last stripe.
  const size_t nblocks = (n - 1) / kBlockNbytes;
  k.rounds(acc, p, nblocks);
  const size_t tail = n - nblocks * kBlockNbytes;
  k.accumulate(acc, p + nblocks * kBlockNbytes, kStripeKeys.bytes, (tail - 1) / kStripeNbytes);
  k.accumulate(acc, p + n - kStripeNbytes, kSecret + kLastStripeOffset, 1);
  return finish_long(acc, n);
}

Digest128 canonical(const U128& h) noexcept {
  Digest128 out;
  const uint64_t high = kBigEndian ? h.high : __builtin_bswap64(h.high);
  const uint64_t low = kBigEndian ? h.low : __builtin_bswap64(h.low);
  std::memcpy(out.data(), &high, 8);
  std::memcpy(out.data() + 8, &low, 8);
  return out;
}

}  // namespace

std::vector<Xxh3Kernel> xxh3_kernels() { return available(); }

const char* xxh3_kernel_name(Xxh3Kernel kernel) noexcept {
  switch (kernel) {
    case Xxh3Kernel::kAuto:
      return "auto";
    case Xxh3Kernel::kScalar:
      return "scalar";
    case Xxh3Kernel::kSse2:
      return "sse2";
    case Xxh3Kernel::kAvx2:
      return "avx2";
    case Xxh3Kernel::kAvx512:
      return "avx512";
  }
  return "?";
}

Xxh3Kernel xxh3_kernel_named(const std::string& name) {
  for (Xxh3Kernel k :
       {Xxh3Kernel::kAuto, Xxh3Kernel::kScalar, Xxh3Kernel::kSse2, Xxh3Kernel::kAvx2, Xxh3Kernel::kAvx512}) {
    if (name == xxh3_kernel_name(k)) {
      resolve(k);
      return k;
    }
  }
  throw std::invalid_argument("unknown XXH3 kernel '" + name + "' (auto, scalar, sse2, avx2 or avx512)");
}

Digest128 xxh3_128(const void* data, size_t nbytes, Xxh3Kernel kernel) {
  const auto* p = static_cast<const uint8_t*>(data);
  const Kernel& k = kernel_of(resolve(kernel));
  return canonical(nbytes <= kMidMaxNbytes ? hash_short(p, nbytes) : hash_long(p, nbytes, k));
}

Xxh3State::Xxh3State(Xxh3Kernel kernel) : kernel_(resolve(kernel)) { reset(); }

void Xxh3State::reset() noexcept {
  init_acc(acc_);
  buffered_ = 0;
  stripes_in_block_ = 0;
  total_nbytes_ = 0;
}

void Xxh3State::consume(const uint8_t* stripes, size_t nstripes) noexcept {
  const Kernel& k = kernel_of(kernel_);
  // A completed block is scrambled at once: a byte after it exists (the invariant), so it
  // is not the input's last block, which one-shot hashing leaves unscrambled.
  while (nstripes > 0) {
    if (stripes_in_block_ == 0 && nstripes >= kStripesPerBlock) {
      const size_t nblocks = nstripes / kStripesPerBlock;
      k.rounds(acc_, stripes, nblocks);
      stripes += nblocks * kBlockNbytes;
      nstripes -= nblocks * kStripesPerBlock;
      continue;
    }
    const size_t take = std::min(nstripes, kStripesPerBlock - stripes_in_block_);
    k.accumulate(acc_, stripes, kStripeKeys.bytes + kStripeNbytes * stripes_in_block_, take);
    stripes += take * kStripeNbytes;
    nstripes -= take;
    stripes_in_block_ += take;
    if (stripes_in_block_ == kStripesPerBlock) {
      k.scramble(acc_);
      stripes_in_block_ = 0;
    }
  }
  std::memcpy(prev_, stripes - kStripeNbytes, kStripeNbytes);
}

void Xxh3State::update(const void* data, size_t nbytes) noexcept {
  const auto* p = static_cast<const uint8_t*>(data);
  total_nbytes_ += nbytes;
  if (buffered_ + nbytes <= kBufferNbytes) {
    if (nbytes > 0) std::memcpy(buffer_ + buffered_, p, nbytes);
    buffered_ += nbytes;
    return;
  }
  if (buffered_ > 0) {
    // Complete the buffer and accumulate it: at least one byte follows.
    const size_t fill = kBufferNbytes - buffered_;
    std::memcpy(buffer_ + buffered_, p, fill);
    p += fill;
    nbytes -= fill;
    consume(buffer_, kBufferNbytes / kStripeNbytes);
    buffered_ = 0;
  }
  // Straight from the caller's bytes, every stripe but those of the last 1..64 bytes.
  const size_t nstripes = (nbytes - 1) / kStripeNbytes;
  if (nstripes > 0) {
    consume(p, nstripes);
    p += nstripes * kStripeNbytes;
    nbytes -= nstripes * kStripeNbytes;
  }
  std::memcpy(buffer_, p, nbytes);
  buffered_ = nbytes;
}

Digest128 Xxh3State::digest() const noexcept {
  if (total_nbytes_ <= kMidMaxNbytes) return canonical(hash_short(buffer_, static_cast<size_t>(total_nbytes_)));
  const Kernel& k = kernel_of(kernel_);
  alignas(64) uint64_t acc[8];
  std::memcpy(acc, acc_, sizeof(acc));
  // The buffer's stripes but its last, as consume() would take them, on a copy.
  size_t in_block = stripes_in_block_;
  const size_t nstripes = (buffered_ - 1) / kStripeNbytes;
  for (size_t s = 0; s < nstripes; s++) {
    k.accumulate(acc, buffer_ + s * kStripeNbytes, kStripeKeys.bytes + kStripeNbytes * in_block, 1);
    if (++in_block == kStripesPerBlock) {
      k.scramble(acc);
      in_block = 0;
    }
  }
  // The final stripe is the input's last 64 bytes, partly from prev_ when fewer are buffered.
  alignas(64) uint8_t last[kStripeNbytes];
  const size_t from_prev = buffered_ < kStripeNbytes ? kStripeNbytes - buffered_ : 0;
  std::memcpy(last, prev_ + kStripeNbytes - from_prev, from_prev);
  std::memcpy(last + from_prev, buffer_ + buffered_ - (kStripeNbytes - from_prev), kStripeNbytes - from_prev);
  k.accumulate(acc, last, kSecret + kLastStripeOffset, 1);
  return canonical(finish_long(acc, total_nbytes_));
}

}  // namespace tensorfile
