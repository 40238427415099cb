// The transfer engine: runs plans of (memory, nbytes, file_offset) regions between host
// memory and a file on the thread pool, checksumming each region as it goes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "regions.hpp"
#include "xxh3.hpp"

namespace tensorfile {

struct TransferOptions {
  size_t num_threads = 1;                // workers, the calling thread included
  size_t task_nbytes = size_t{8} << 20;  // bytes per task (one pread/pwrite)
  bool checksum = true;                  // compute a checksum per region
  bool zip_crc = false;                  // that checksum is zip's CRC-32 rather than CRC32C
  bool hugepages = false;                // read: ask for huge pages on destinations first
  bool writeback = false;                // write: start writeback of each task's bytes at once
};

// Writes every region; regions must be sorted by file_offset and must not overlap.
// Bytes between regions are not written: the caller creates a fresh file, whose holes
// read as zeros. Small regions are gathered into one write per task. Returns the CRC32C
// of each region (0s when !checksum), of the bytes the file received: with checksums,
// each task's bytes are checksummed as they are copied to a buffer of its worker's and
// written from there, so memory that changes during the call (another thread updating
// a tensor) gives a torn snapshot whose checksums hold, never a file that fails them.
// Call without the GIL.
std::vector<uint32_t> write_regions(int fd, const std::vector<Region>& regions, const TransferOptions& options,
                                    const std::string& path);

// Reads every region into its memory; regions in any order, not overlapping (they are
// read in file order). With check_gaps, every byte of [gap_begin, gap_end) outside the
// regions must be zero (the format's padding rule), else FormatError. Returns each
// region's checksum, in the order given. Call without the GIL.
std::vector<uint32_t> read_regions(int fd, const std::vector<Region>& regions, const TransferOptions& options,
                                   bool check_gaps, uint64_t gap_begin, uint64_t gap_end, const std::string& path);

// CRC32C of each memory region, computed in parallel chunks (file_offset is ignored).
std::vector<uint32_t> checksum_regions(const std::vector<Region>& regions, const TransferOptions& options);

// XXH3-128 of each memory region (file_offset is ignored), in the order given, on up to
// num_threads workers (the calling thread included). A region is hashed whole by one
// worker, since XXH3 digests of parts do not combine; the largest regions start first so
// that one large region does not run alone at the end. Call without the GIL.
// With `crcs`, also the CRC32C of each region, in the same pass over memory.
std::vector<Digest128> hash_regions(const std::vector<Region>& regions, size_t num_threads,
                                    std::vector<uint32_t>* crcs = nullptr);

}  // namespace tensorfile
