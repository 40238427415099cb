// The rules shared by every transfer (see regions.hpp).
#include "regions.hpp"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <stdexcept>

#include "crc32.hpp"
#include "crc32c.hpp"
#include "errors.hpp"

namespace tensorfile {

void check_sorted(const std::vector<Region>& regions) {
  for (size_t i = 1; i < regions.size(); i++) {
    const Region& a = regions[i - 1];
    if (regions[i].file_offset < a.file_offset || regions[i].file_offset - a.file_offset < a.nbytes) {
      throw std::invalid_argument("regions must be sorted by file_offset and must not overlap");
    }
  }
}

FileOrder::FileOrder(const std::vector<Region>& regions) : given_(regions) {
  const auto by_offset = [](const Region& a, const Region& b) { return a.file_offset < b.file_offset; };
  if (std::is_sorted(regions.begin(), regions.end(), by_offset)) return;
  order_.resize(regions.size());
  std::iota(order_.begin(), order_.end(), size_t{0});
  std::stable_sort(order_.begin(), order_.end(),
                   [&](size_t a, size_t b) { return regions[a].file_offset < regions[b].file_offset; });
  sorted_.resize(regions.size());
  for (size_t k = 0; k < order_.size(); k++) sorted_[k] = regions[order_[k]];
}

std::vector<uint32_t> FileOrder::restore(std::vector<uint32_t> results) const {
  if (order_.empty()) return results;
  std::vector<uint32_t> out(results.size());
  for (size_t k = 0; k < order_.size(); k++) out[order_[k]] = results[k];
  return out;
}

void require_zero(const unsigned char* p, size_t nbytes, uint64_t file_offset, const std::string& path) {
  for (size_t k = 0; k < nbytes; k++) {
    if (p[k] != 0) {
      throw FormatError(path + ": padding byte at offset " + std::to_string(file_offset + k) +
                        " is not zero (the file is damaged or was not written by tensorfile)");
    }
  }
}

uint32_t checksum(bool zip_crc, const void* data, size_t nbytes, uint32_t crc) noexcept {
  return zip_crc ? crc32_zip(data, nbytes, crc) : crc32c(data, nbytes, crc);
}

uint32_t checksum_copy(bool zip_crc, void* dst, const void* src, size_t nbytes, uint32_t crc) noexcept {
  if (!zip_crc) return crc32c_copy(dst, src, nbytes, crc);
  std::memcpy(dst, src, nbytes);
  return crc32_zip(dst, nbytes, crc);
}

uint32_t checksum_combine(bool zip_crc, uint32_t crc_a, uint32_t crc_b, size_t nbytes_b) noexcept {
  return zip_crc ? crc32_zip_combine(crc_a, crc_b, nbytes_b) : crc32c_combine(crc_a, crc_b, nbytes_b);
}

}  // namespace tensorfile
