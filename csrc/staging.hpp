// Transfers between files and device memory: a ring of pinned staging buffers per worker
// with reads (or writes) overlapped with asynchronous copies, or GPUDirect Storage.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "device.hpp"
#include "regions.hpp"

namespace tensorfile {

struct StagingOptions {
  size_t num_threads = 1;                    // workers, each with a stream and a ring
  size_t staging_nbytes = size_t{16} << 20;  // bytes per staging buffer (one read or write)
  size_t staging_buffers = 4;                // buffers per worker
  bool checksum = true;                      // CRC32C of each region
  bool zip_crc = false;                      // that checksum is zip's CRC-32 rather than CRC32C
  int gds_fd = -1;                           // an O_DIRECT descriptor of the same file: use cuFile
};

// Reads every region (ptr = device memory of `device`) from `fd`. Regions in any order,
// not overlapping (they are read in file order); zero ranges sorted, not overlapping,
// and disjoint from the regions. Returns each region's checksum in the order given (0s
// when !checksum). The first failure wins: the other
// workers stop, every queued copy is drained and every buffer, stream and event
// released before it is rethrown. Blocks until all data has landed. Call without the
// GIL; the caller must keep the destinations alive and unused until it returns.
std::vector<uint32_t> read_to_device(Device& device, int fd, const std::vector<Region>& regions,
                                     const std::vector<ZeroRange>& zeros, const StagingOptions& options,
                                     const std::string& path);

// Writes every region (ptr = device memory) to `fd`, the reverse of read_to_device;
// bytes between regions that share a staging buffer are written as zeros, others are
// left as holes. Returns each region's CRC32C, computed from the staged bytes.
std::vector<uint32_t> write_from_device(Device& device, int fd, const std::vector<Region>& regions,
                                        const StagingOptions& options, const std::string& path);

}  // namespace tensorfile
