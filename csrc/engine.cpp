// Plans regions into tasks (large regions split into chunks, runs of small regions
// gathered into one call) and runs them on the thread pool; a checksummed write passes
// each task's bytes through a buffer of its worker's (BounceWriter).
#include "engine.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <memory>
#include <numeric>

#include "crc32c.hpp"
#include "errors.hpp"
#include "file.hpp"
#include "thread_pool.hpp"

namespace tensorfile {

namespace {

// Regions below this size are gathered with their neighbours; above it a region is
// moved in place, one task per task_nbytes chunk.
constexpr uint64_t kGatherBelow = uint64_t{256} << 10;
// Each gathered region takes two iovecs (data, padding).
constexpr size_t kMaxGatherRegions = (IOV_MAX > 2048 ? 1024 : IOV_MAX / 2) - 1;
constexpr size_t kPadding = 4096;  // the format's alignment; gaps are shorter
// A write task's bounce buffer holds at most this much; a larger task is written in parts.
constexpr uint64_t kMaxBounce = uint64_t{8} << 20;

alignas(64) const unsigned char kZeros[kPadding] = {};

struct Task {
  enum Kind { kChunk, kGather, kGap } kind;
  // kChunk: bytes [offset, offset + nbytes) of region `first`, CRC into chunk slot `slot`.
  // kGather: regions [first, last), file bytes [begin, end).
  // kGap: file bytes [begin, end) that must be zero.
  size_t first = 0, last = 0, slot = 0;
  uint64_t offset = 0, nbytes = 0, begin = 0, end = 0;
};

struct Plan {
  std::vector<Task> tasks;
  std::vector<size_t> chunk_begin;  // per region: first chunk slot (chunked regions)
  std::vector<size_t> chunk_count;  // per region: number of chunks (0 if gathered)
  size_t nchunks = 0;
};

// gap_end == 0 means "no gap checking": gathered spans cover only the regions.
Plan make_plan(const std::vector<Region>& regions, uint64_t task_nbytes, bool check_gaps, uint64_t gap_begin,
               uint64_t gap_end) {
  Plan plan;
  const size_t n = regions.size();
  plan.chunk_begin.assign(n, 0);
  plan.chunk_count.assign(n, 0);
  if (task_nbytes < kPadding) task_nbytes = kPadding;
  // Where the bytes owned by region i end: its padding runs to the next region.
  auto padded_end = [&](size_t i) -> uint64_t {
    uint64_t end = regions[i].file_offset + regions[i].nbytes;
    if (!check_gaps) return end;
    return i + 1 < n ? regions[i + 1].file_offset : std::max(end, gap_end);
  };
  if (check_gaps) {
    uint64_t first_offset = n ? regions[0].file_offset : gap_end;
    for (uint64_t b = gap_begin; b < first_offset; b += task_nbytes) {
      Task t{Task::kGap};
      t.begin = b;
      t.end = std::min(first_offset, b + task_nbytes);
      plan.tasks.push_back(t);
    }
  }
  size_t i = 0;
  while (i < n) {
    if (regions[i].nbytes >= kGatherBelow) {
      plan.chunk_begin[i] = plan.nchunks;
      for (uint64_t off = 0; off < regions[i].nbytes; off += task_nbytes) {
        Task t{Task::kChunk};
        t.first = i;
        t.offset = off;
        t.nbytes = std::min(task_nbytes, regions[i].nbytes - off);
        t.slot = plan.nchunks++;
        plan.tasks.push_back(t);
        plan.chunk_count[i]++;
      }
      uint64_t end = regions[i].file_offset + regions[i].nbytes;
      if (padded_end(i) > end) {
        Task t{Task::kGap};
        t.begin = end;
        t.end = padded_end(i);
        plan.tasks.push_back(t);
      }
      i++;
      continue;
    }
    Task t{Task::kGather};
    t.first = i;
    t.begin = regions[i].file_offset;
    // A gathered gap must fit one padding-sized iovec (format gaps are always shorter).
    while (
        i < n && regions[i].nbytes < kGatherBelow && i - t.first < kMaxGatherRegions &&
        (i == t.first || (padded_end(i) - t.begin <= task_nbytes &&
                          regions[i].file_offset - (regions[i - 1].file_offset + regions[i - 1].nbytes) < kPadding))) {
      i++;
    }
    t.last = i;
    t.end = padded_end(i - 1);
    plan.tasks.push_back(t);
  }
  return plan;
}

std::vector<uint32_t> fold_chunks(const std::vector<Region>& regions, const Plan& plan,
                                  const std::vector<uint32_t>& chunk_crcs, std::vector<uint32_t> crcs,
                                  const TransferOptions& options) {
  uint64_t task_nbytes = options.task_nbytes;
  if (task_nbytes < kPadding) task_nbytes = kPadding;
  for (size_t i = 0; i < regions.size(); i++) {
    if (plan.chunk_count[i] == 0) continue;
    uint32_t crc = chunk_crcs[plan.chunk_begin[i]];
    for (size_t c = 1; c < plan.chunk_count[i]; c++) {
      uint64_t len = std::min(task_nbytes, regions[i].nbytes - c * task_nbytes);
      crc = checksum_combine(options.zip_crc, crc, chunk_crcs[plan.chunk_begin[i] + c], len);
    }
    crcs[i] = crc;
  }
  return crcs;
}

// Maps the pages of [dst, dst + nbytes) in one call before a read lands there. A read
// into fresh memory otherwise takes one page fault per 4 KiB page inside the copy; with
// the pages mapped up front, a 1 GiB read from the page cache into fresh memory ran at
// 3.6 GB/s against 2.7 GB/s (2 threads). Advisory: older kernels (before 5.14) answer
// EINVAL and the read faults the pages in as before; a real problem still fails the read.
void prefault(void* dst, size_t nbytes) noexcept {
#ifdef __linux__
#ifndef MADV_POPULATE_WRITE
  constexpr int MADV_POPULATE_WRITE = 23;
#endif
  static const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t p = reinterpret_cast<uintptr_t>(dst);
  const uintptr_t begin = (p + page - 1) & ~(page - 1);
  const uintptr_t end = (p + nbytes) & ~(page - 1);
  if (end > begin) (void)::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_POPULATE_WRITE);
#else
  (void)dst;
  (void)nbytes;
#endif
}

// Starts the disk write of bytes just written without waiting for it, so that the
// device works while later tasks are still copying into the page cache and the final
// fsync finds little left to do. Advisory: the fsync that follows reports any error.
void start_writeback(int fd, uint64_t file_offset, uint64_t nbytes) noexcept {
#if defined(__linux__) && defined(SYNC_FILE_RANGE_WRITE)
  // nbytes 0 would mean "to the end of the file"
  if (nbytes)
    (void)::sync_file_range(fd, static_cast<off_t>(file_offset), static_cast<off_t>(nbytes), SYNC_FILE_RANGE_WRITE);
#else
  (void)fd;
  (void)file_offset;
  (void)nbytes;
#endif
}

// Asks the kernel for transparent huge pages on the 2 MiB-aligned interior of
// [ptr, ptr + nbytes) before it is first touched; a no-op where unsupported.
void advise_hugepages(uintptr_t ptr, uint64_t nbytes) noexcept {
#ifdef MADV_HUGEPAGE
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  uintptr_t begin = (ptr + kHuge - 1) & ~(kHuge - 1);
  uintptr_t end = (ptr + nbytes) & ~(kHuge - 1);
  if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)ptr;
  (void)nbytes;
#endif
}

// The bytes of a write task pass through a buffer of the worker's own: checksummed as
// they are copied in (one read of the caller's memory) and written from there, so that
// each checksum is of exactly the bytes that reach the file even while the caller's
// memory changes under the write (a tensor that another thread updates). Measured on a
// 1 GiB write (1 MiB tasks, 2 threads): about 10% more CPU time than checksumming the
// caller's memory and writing it; a copy followed by a separate checksum cost 20-25%.
class BounceWriter {
 public:
  BounceWriter(unsigned char* buf, size_t capacity, int fd, uint64_t file_offset, const std::string& path)
      : buf_(buf), capacity_(capacity), fd_(fd), at_(file_offset), path_(path) {}

  void zeros(uint64_t nbytes) {
    while (nbytes > 0) {
      if (fill_ == capacity_) flush();
      const size_t n = static_cast<size_t>(std::min<uint64_t>(nbytes, capacity_ - fill_));
      std::memset(buf_ + fill_, 0, n);
      fill_ += n;
      nbytes -= n;
    }
  }

  // Appends [src, src + nbytes); returns the checksum of the bytes appended.
  uint32_t copy(const unsigned char* src, uint64_t nbytes, bool zip_crc) {
    uint32_t crc = 0;
    while (nbytes > 0) {
      if (fill_ == capacity_) flush();
      const size_t n = static_cast<size_t>(std::min<uint64_t>(nbytes, capacity_ - fill_));
      crc = checksum_copy(zip_crc, buf_ + fill_, src, n, crc);
      fill_ += n;
      src += n;
      nbytes -= n;
    }
    return crc;
  }

  void flush() {
    if (fill_ > 0) pwrite_full(fd_, buf_, fill_, at_, path_);
    at_ += fill_;
    fill_ = 0;
  }

 private:
  unsigned char* buf_;
  size_t capacity_;
  size_t fill_ = 0;
  int fd_;
  uint64_t at_;
  const std::string& path_;
};

}  // namespace

std::vector<uint32_t> write_regions(int fd, const std::vector<Region>& regions, const TransferOptions& options,
                                    const std::string& path) {
  check_sorted(regions);
  const Plan plan = make_plan(regions, options.task_nbytes, /*check_gaps=*/false, 0, 0);
  std::vector<uint32_t> crcs(regions.size(), 0), chunk_crcs(plan.nchunks, 0);
  // One bounce buffer per worker, allocated on its first task, as large as the largest
  // task (at least the format's padding, at most kMaxBounce).
  uint64_t largest = kPadding;
  for (const Task& t : plan.tasks) largest = std::max(largest, t.kind == Task::kChunk ? t.nbytes : t.end - t.begin);
  const size_t bounce_nbytes = static_cast<size_t>(std::min<uint64_t>(largest, kMaxBounce));
  std::vector<std::unique_ptr<unsigned char[]>> bounce(options.checksum ? std::max<size_t>(1, options.num_threads) : 0);
  default_pool().parallel_for(plan.tasks.size(), options.num_threads, [&](size_t worker, size_t k) {
    const Task& t = plan.tasks[k];
    if (t.kind == Task::kGap) return;  // holes in a fresh file read as zeros
    if (options.checksum) {
      if (!bounce[worker]) bounce[worker].reset(new unsigned char[bounce_nbytes]);
      if (t.kind == Task::kChunk) {
        const auto* src = reinterpret_cast<const unsigned char*>(regions[t.first].ptr) + t.offset;
        const uint64_t at = regions[t.first].file_offset + t.offset;
        BounceWriter out(bounce[worker].get(), bounce_nbytes, fd, at, path);
        chunk_crcs[t.slot] = out.copy(src, t.nbytes, options.zip_crc);
        out.flush();
        if (options.writeback) start_writeback(fd, at, t.nbytes);
        return;
      }
      BounceWriter out(bounce[worker].get(), bounce_nbytes, fd, t.begin, path);
      uint64_t cursor = t.begin;
      for (size_t i = t.first; i < t.last; i++) {
        const Region& r = regions[i];
        out.zeros(r.file_offset - cursor);
        crcs[i] = out.copy(reinterpret_cast<const unsigned char*>(r.ptr), r.nbytes, options.zip_crc);
        cursor = r.file_offset + r.nbytes;
      }
      out.flush();
      if (options.writeback) start_writeback(fd, t.begin, cursor - t.begin);
      return;
    }
    // Without checksums nothing can disagree with the bytes written: straight from memory.
    if (t.kind == Task::kChunk) {
      const auto* src = reinterpret_cast<const unsigned char*>(regions[t.first].ptr) + t.offset;
      pwrite_full(fd, src, t.nbytes, regions[t.first].file_offset + t.offset, path);
      if (options.writeback) start_writeback(fd, regions[t.first].file_offset + t.offset, t.nbytes);
      return;
    }
    std::vector<iovec> iov;
    iov.reserve(2 * (t.last - t.first));
    uint64_t cursor = t.begin;
    for (size_t i = t.first; i < t.last; i++) {
      const Region& r = regions[i];
      if (r.file_offset > cursor) iov.push_back({const_cast<unsigned char*>(kZeros), r.file_offset - cursor});
      if (r.nbytes) iov.push_back({reinterpret_cast<void*>(r.ptr), r.nbytes});
      cursor = r.file_offset + r.nbytes;
    }
    pwritev_full(fd, iov, t.begin, path);
    if (options.writeback) start_writeback(fd, t.begin, cursor - t.begin);
  });
  return fold_chunks(regions, plan, chunk_crcs, std::move(crcs), options);
}

std::vector<uint32_t> read_regions(int fd, const std::vector<Region>& given, const TransferOptions& options,
                                   bool check_gaps, uint64_t gap_begin, uint64_t gap_end, const std::string& path) {
  const FileOrder order(given);
  const std::vector<Region>& regions = order.regions();
  check_sorted(regions);
  if (options.hugepages) {
    for (const Region& r : regions) advise_hugepages(r.ptr, r.nbytes);
  }
  const Plan plan = make_plan(regions, options.task_nbytes, check_gaps, gap_begin, gap_end);
  std::vector<uint32_t> crcs(regions.size(), 0), chunk_crcs(plan.nchunks, 0);
  default_pool().parallel_for(plan.tasks.size(), options.num_threads, [&](size_t, size_t k) {
    const Task& t = plan.tasks[k];
    if (t.kind == Task::kGap) {
      unsigned char buf[kPadding];
      for (uint64_t b = t.begin; b < t.end; b += kPadding) {
        size_t len = static_cast<size_t>(std::min<uint64_t>(kPadding, t.end - b));
        pread_full(fd, buf, len, b, path);
        require_zero(buf, len, b, path);
      }
      return;
    }
    if (t.kind == Task::kChunk) {
      auto* dst = reinterpret_cast<unsigned char*>(regions[t.first].ptr) + t.offset;
      prefault(dst, t.nbytes);
      pread_full(fd, dst, t.nbytes, regions[t.first].file_offset + t.offset, path);
      if (options.checksum) chunk_crcs[t.slot] = checksum(options.zip_crc, dst, t.nbytes);
      return;
    }
    // Gaps inside a gathered span land in `pad`, one slot per gap, and are checked after.
    std::vector<iovec> iov;
    iov.reserve(2 * (t.last - t.first) + 1);
    std::vector<unsigned char> pad;
    std::vector<std::pair<uint64_t, size_t>> gaps;  // (file offset, pad index)
    uint64_t cursor = t.begin;
    auto add_gap = [&](uint64_t upto) {
      if (upto <= cursor) return;
      gaps.emplace_back(cursor, pad.size());
      pad.resize(pad.size() + (upto - cursor));
    };
    for (size_t i = t.first; i < t.last; i++) {
      add_gap(regions[i].file_offset);
      cursor = regions[i].file_offset + regions[i].nbytes;
    }
    add_gap(t.end);
    size_t g = 0;
    cursor = t.begin;
    for (size_t i = t.first; i < t.last; i++) {
      const Region& r = regions[i];
      if (r.file_offset > cursor) {
        iov.push_back({pad.data() + gaps[g].second, r.file_offset - cursor});
        g++;
      }
      if (r.nbytes) iov.push_back({reinterpret_cast<void*>(r.ptr), r.nbytes});
      cursor = r.file_offset + r.nbytes;
    }
    if (t.end > cursor) iov.push_back({pad.data() + gaps[g].second, t.end - cursor});
    preadv_full(fd, iov, t.begin, path);
    if (check_gaps) {
      for (size_t j = 0; j < gaps.size(); j++) {
        size_t len = (j + 1 < gaps.size() ? gaps[j + 1].second : pad.size()) - gaps[j].second;
        require_zero(pad.data() + gaps[j].second, len, gaps[j].first, path);
      }
    }
    if (options.checksum) {
      for (size_t i = t.first; i < t.last; i++)
        crcs[i] = checksum(options.zip_crc, reinterpret_cast<const void*>(regions[i].ptr), regions[i].nbytes);
    }
  });
  return order.restore(fold_chunks(regions, plan, chunk_crcs, std::move(crcs), options));
}

std::vector<uint32_t> checksum_regions(const std::vector<Region>& input, const TransferOptions& options) {
  // Give the regions disjoint virtual offsets so the planner can treat them like a file.
  std::vector<Region> regions(input);
  uint64_t cursor = 0;
  for (Region& r : regions) {
    r.file_offset = cursor;
    cursor += r.nbytes;
  }
  const Plan plan = make_plan(regions, options.task_nbytes, false, 0, 0);
  std::vector<uint32_t> crcs(regions.size(), 0), chunk_crcs(plan.nchunks, 0);
  default_pool().parallel_for(plan.tasks.size(), options.num_threads, [&](size_t, size_t k) {
    const Task& t = plan.tasks[k];
    if (t.kind == Task::kChunk) {
      chunk_crcs[t.slot] =
          checksum(options.zip_crc, reinterpret_cast<const unsigned char*>(regions[t.first].ptr) + t.offset, t.nbytes);
    } else if (t.kind == Task::kGather) {
      for (size_t i = t.first; i < t.last; i++)
        crcs[i] = checksum(options.zip_crc, reinterpret_cast<const void*>(regions[i].ptr), regions[i].nbytes);
    }
  });
  return fold_chunks(regions, plan, chunk_crcs, std::move(crcs), options);
}

std::vector<Digest128> hash_regions(const std::vector<Region>& regions, size_t num_threads,
                                    std::vector<uint32_t>* crcs) {
  std::vector<size_t> order(regions.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return regions[a].nbytes > regions[b].nbytes; });
  std::vector<Digest128> digests(regions.size());
  if (crcs != nullptr) crcs->assign(regions.size(), 0);
  default_pool().parallel_for(order.size(), num_threads, [&](size_t, size_t k) {
    const Region& r = regions[order[k]];
    const auto* p = reinterpret_cast<const uint8_t*>(r.ptr);
    const auto n = static_cast<size_t>(r.nbytes);
    if (crcs == nullptr) {
      digests[order[k]] = xxh3_128(p, n);
      return;
    }
    // Both in one pass over memory: each block is hashed, then checksummed while it is
    // still in cache.
    constexpr size_t kBlock = 64 << 10;
    Xxh3State state;
    uint32_t crc = 0;
    for (size_t at = 0; at < n; at += kBlock) {
      const size_t len = std::min(kBlock, n - at);
      state.update(p + at, len);
      crc = crc32c(p + at, len, crc);
    }
    digests[order[k]] = state.digest();
    (*crcs)[order[k]] = crc;
  });
  return digests;
}

}  // namespace tensorfile
