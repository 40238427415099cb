// The transfer engine: runs plans of (memory, nbytes, file_offset) regions between host
// memory and a file on the thread pool, checksumming each region as it goes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace tensorfile {

struct Region {
  uintptr_t ptr;         // host memory (source on write, destination on read)
  uint64_t nbytes;       // bytes to move
  uint64_t file_offset;  // where they sit in the file
};

struct TransferOptions {
  size_t num_threads = 1;                // workers, the calling thread included
  size_t task_nbytes = size_t{8} << 20;  // bytes per task (one pread/pwrite)
  bool checksum = true;                  // compute CRC32C per region
  bool hugepages = false;                // read: ask for huge pages on destinations first
};

// Writes every region; regions must be sorted by file_offset and must not overlap.
// Bytes between regions are not written: the caller creates a fresh file, whose holes
// read as zeros. Small regions are gathered into one pwritev per task. Returns the
// CRC32C of each region (0s when !checksum). Call without the GIL.
std::vector<uint32_t> write_regions(int fd, const std::vector<Region>& regions, const TransferOptions& options,
                                    const std::string& path);

// Reads every region into its memory; regions sorted by file_offset, not overlapping.
// With check_gaps, every byte of [gap_begin, gap_end) outside the regions must be zero
// (the format's padding rule), else FormatError. Returns each region's CRC32C.
std::vector<uint32_t> read_regions(int fd, const std::vector<Region>& regions, const TransferOptions& options,
                                   bool check_gaps, uint64_t gap_begin, uint64_t gap_end, const std::string& path);

// CRC32C of each memory region, computed in parallel chunks (file_offset is ignored).
std::vector<uint32_t> checksum_regions(const std::vector<Region>& regions, const TransferOptions& options);

// Asks the kernel for transparent huge pages on the 2 MiB-aligned interior of
// [ptr, ptr + nbytes) before it is first touched; a no-op where unsupported.
void advise_hugepages(uintptr_t ptr, uint64_t nbytes) noexcept;

}  // namespace tensorfile
