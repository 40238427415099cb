// What every transfer takes (regions of memory and the file ranges they map to) and the
// rules every transfer shares: file order, the format's zero padding, the checksum kinds.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace tensorfile {

struct Region {
  uintptr_t ptr;         // host or device memory (source on write, destination on read)
  uint64_t nbytes;       // bytes to move
  uint64_t file_offset;  // where they sit in the file
};

// A file range whose bytes must be zero (the format's padding), checked on load.
struct ZeroRange {
  uint64_t file_offset;
  uint64_t nbytes;
};

// Throws std::invalid_argument unless the regions are sorted by file_offset and no two
// of them overlap.
void check_sorted(const std::vector<Region>& regions);

// The regions in file order, as a read runs them, and a way to put each region's result
// back in the caller's order: a torch.save zip numbers its storages in pickle order,
// which need not be the order of their records in the file. Holds no copy when the
// regions were in file order already; `regions` must outlive it.
class FileOrder {
 public:
  explicit FileOrder(const std::vector<Region>& regions);
  const std::vector<Region>& regions() const { return order_.empty() ? given_ : sorted_; }
  std::vector<uint32_t> restore(std::vector<uint32_t> results) const;

 private:
  const std::vector<Region>& given_;
  std::vector<Region> sorted_;
  std::vector<size_t> order_;  // sorted_[k] is given_[order_[k]]; empty when already sorted
};

// Throws FormatError naming `path` and the offset of the first nonzero byte of
// [p, p + nbytes), which sits at `file_offset` in the file.
void require_zero(const unsigned char* p, size_t nbytes, uint64_t file_offset, const std::string& path);

// The checksum a transfer computes per region, continuing from `crc`: CRC32C (the native
// format), or zip's CRC-32 with zip_crc (torch.save archives); and its combine step.
uint32_t checksum(bool zip_crc, const void* data, size_t nbytes, uint32_t crc = 0) noexcept;
// Copies nbytes from src to dst and returns the checksum of the bytes dst received.
uint32_t checksum_copy(bool zip_crc, void* dst, const void* src, size_t nbytes, uint32_t crc = 0) noexcept;
uint32_t checksum_combine(bool zip_crc, uint32_t crc_a, uint32_t crc_b, size_t nbytes_b) noexcept;

}  // namespace tensorfile
