// XXH3-128 (seed 0, the default secret), the content hash that tells whether a storage's
// bytes equal ones already on disk: one-shot and streaming, written from the xxHash
// specification (Cyan4973/xxHash doc/xxhash_spec.md, "XXH3 algorithm description").
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace tensorfile {

// A digest in xxHash's canonical order: the high 64 bits, then the low 64 bits, each
// big-endian (the bytes python-xxhash's xxh3_128_digest returns).
using Digest128 = std::array<uint8_t, 16>;

// The loop over the 64-byte stripes of inputs longer than 240 bytes, where nearly all of
// the time goes. Every kernel gives the same digests; kAuto is the fastest one available.
enum class Xxh3Kernel { kAuto, kScalar, kSse2, kAvx2, kAvx512 };

// The kernels this build can run on this CPU, slowest first (kScalar always; kSse2 on
// x86-64; kAvx2 and kAvx512 (AVX-512F) where the CPU has them); kAuto resolves to the last.
std::vector<Xxh3Kernel> xxh3_kernels();
// "scalar", "sse2", "avx2", "avx512" ("auto" for kAuto), and back; std::invalid_argument for a
// name that is not a kernel of xxh3_kernels() (or "auto").
const char* xxh3_kernel_name(Xxh3Kernel kernel) noexcept;
Xxh3Kernel xxh3_kernel_named(const std::string& name);

// XXH3-128 of the `nbytes` bytes at `data` (any alignment). Thread safe, allocates
// nothing. The kernel must be one of xxh3_kernels() (std::invalid_argument otherwise).
Digest128 xxh3_128(const void* data, size_t nbytes, Xxh3Kernel kernel = Xxh3Kernel::kAuto);

// Streaming XXH3-128: digest() is xxh3_128 of every byte given to update() since the
// last reset, however the bytes were split between calls. digest() does not change the
// state, so updates may continue after it. One state per thread (not thread safe); it
// holds no pointer to the caller's bytes between calls.
class Xxh3State {
 public:
  explicit Xxh3State(Xxh3Kernel kernel = Xxh3Kernel::kAuto);
  void reset() noexcept;
  void update(const void* data, size_t nbytes) noexcept;
  Digest128 digest() const noexcept;

 private:
  static constexpr size_t kBufferNbytes = 256;  // four stripes

  void consume(const uint8_t* stripes, size_t nstripes) noexcept;

  // The invariant: bytes are accumulated only once a later byte is known to exist, so
  // the buffer holds the last 1..256 bytes given (all of them up to 256) and prev_ the
  // last stripe accumulated, which the final stripe may overlap.
  alignas(64) uint64_t acc_[8];
  alignas(64) uint8_t buffer_[kBufferNbytes];
  uint8_t prev_[64];
  size_t buffered_ = 0;
  size_t stripes_in_block_ = 0;  // stripes of the current 1024-byte block accumulated
  uint64_t total_nbytes_ = 0;
  Xxh3Kernel kernel_;
};

}  // namespace tensorfile
