// The staging pipeline (see staging.hpp). Regions and zero ranges are cut into batches:
// contiguous file ranges of at most one staging buffer, so a large region becomes
// several batches and many small ones share one read or write.
#include "staging.hpp"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <limits>
#include <memory>
#include <stdexcept>
#include <thread>

#include "errors.hpp"
#include "file.hpp"
#include "shim/cufile.hpp"
#include "thread_pool.hpp"

namespace tensorfile {

namespace {

constexpr size_t kZeroPiece = std::numeric_limits<size_t>::max();
// A gap up to this size between two pieces is read through (and discarded) rather than
// starting a new batch: one larger read beats two small ones. The format's padding is
// always shorter.
constexpr uint64_t kBridge = uint64_t{64} << 10;

// GPUDirect destinations and sources at least this large are registered with cuFile for
// the transfer. Unregistered, cuFile moves the bytes through its own pinned bounce
// buffers (1 MiB each by default), one extra device copy per buffer; registering maps
// the buffer for the nvidia-fs driver, a fixed cost per call that exceeds the copy it
// saves below about one bounce buffer. TENSORFILE_GDS_REGISTER=0 turns it off (to
// measure the difference).
constexpr uint64_t kRegisterMin = uint64_t{1} << 20;

void register_buffers(cufile::BufferRegistrations& out, const std::vector<Region>& regions) {
  const char* setting = std::getenv("TENSORFILE_GDS_REGISTER");
  if (setting && std::strcmp(setting, "0") == 0) return;
  for (const Region& r : regions) {
    if (r.nbytes >= kRegisterMin) out.add(reinterpret_cast<const void*>(r.ptr), r.nbytes);
  }
}

struct Piece {
  size_t region;  // index into regions, or kZeroPiece for bytes that must be zero
  uint64_t region_offset, nbytes, batch_offset;
};

struct Batch {
  uint64_t file_begin, file_end;
  size_t first, last;  // pieces [first, last)
};

struct Plan {
  std::vector<Batch> batches;
  std::vector<Piece> pieces;
};

Plan make_plan(const std::vector<Region>& regions, const std::vector<ZeroRange>& zeros, uint64_t staging_nbytes) {
  struct Segment {
    uint64_t file_offset, nbytes;
    size_t region;
  };
  std::vector<Segment> segments;
  segments.reserve(regions.size() + zeros.size());
  for (size_t i = 0; i < regions.size(); i++) segments.push_back({regions[i].file_offset, regions[i].nbytes, i});
  for (const ZeroRange& z : zeros) segments.push_back({z.file_offset, z.nbytes, kZeroPiece});
  std::stable_sort(segments.begin(), segments.end(),
                   [](const Segment& a, const Segment& b) { return a.file_offset < b.file_offset; });
  for (size_t i = 1; i < segments.size(); i++) {
    const Segment& a = segments[i - 1];
    if (segments[i].file_offset - a.file_offset < a.nbytes) {
      throw std::invalid_argument("regions and zero ranges must not overlap");
    }
  }
  Plan plan;
  bool open = false;
  Batch cur{};
  auto close = [&] {
    if (open) {
      cur.last = plan.pieces.size();
      plan.batches.push_back(cur);
    }
    open = false;
  };
  for (const Segment& s : segments) {
    uint64_t done = 0;
    while (done < s.nbytes) {
      uint64_t at = s.file_offset + done;
      if (!open || at - cur.file_end > kBridge || at - cur.file_begin >= staging_nbytes) {
        close();
        cur = Batch{at, at, plan.pieces.size(), 0};
        open = true;
      }
      uint64_t take = std::min(s.nbytes - done, cur.file_begin + staging_nbytes - at);
      plan.pieces.push_back(Piece{s.region, done, take, at - cur.file_begin});
      cur.file_end = at + take;
      done += take;
    }
  }
  close();
  return plan;
}

std::vector<uint32_t> fold(const std::vector<Region>& regions, const Plan& plan,
                           const std::vector<uint32_t>& piece_crcs, const StagingOptions& o) {
  std::vector<uint32_t> crcs(regions.size(), 0);
  std::vector<char> seen(regions.size(), 0);
  for (size_t i = 0; i < plan.pieces.size(); i++) {
    const Piece& p = plan.pieces[i];
    if (p.region == kZeroPiece) continue;
    uint32_t crc = piece_crcs[i];
    if (seen[p.region]) crc = checksum_combine(o.zip_crc, crcs[p.region], crc, p.nbytes);
    crcs[p.region] = crc;
    seen[p.region] = 1;
  }
  return crcs;
}

// One worker's stream, ring of pinned staging buffers and events. The destructor waits
// for the stream before handing the buffers back, so no copy outlives its buffer.
class Lane {
 public:
  Lane(Device& device, size_t nbytes) : device_(device), nbytes_(nbytes) {}
  Lane(const Lane&) = delete;
  Lane& operator=(const Lane&) = delete;

  // `caller`: this is the thread that called in, whose current device is put back
  // afterwards; a pool thread stays on the device (setting it back would create a
  // context on a device that thread never used).
  void open(size_t count, bool caller) {
    previous_ = device_.bind();
    bound_ = caller;
    bufs_.reserve(count);
    events_.reserve(count);
    stream_ = device_.create_stream();
    for (size_t i = 0; i < count; i++) {
      bufs_.push_back(static_cast<unsigned char*>(device_.acquire_pinned(nbytes_)));
      events_.push_back(device_.create_event());
    }
    busy_.assign(count, 0);
  }

  ~Lane() {
    if (stream_) {
      try {
        device_.synchronize(stream_);
      } catch (...) {
        // The first error has been reported already; this one only says the same.
      }
    }
    for (void* e : events_) device_.destroy_event(e);
    for (unsigned char* b : bufs_) device_.release_pinned(b, nbytes_);
    if (stream_) device_.destroy_stream(stream_);
    if (bound_) device_.restore(previous_);
  }

  Device& device() { return device_; }
  void* stream() { return stream_; }
  size_t count() const { return bufs_.size(); }
  unsigned char* buf(size_t k) { return bufs_[k]; }
  void* event(size_t k) { return events_[k]; }

  // Waits until slot k's last copy has finished, so its buffer may be reused.
  void reclaim(size_t k) {
    if (busy_[k]) device_.wait(events_[k]);
    busy_[k] = 0;
  }
  void mark(size_t k) {
    device_.record(events_[k], stream_);
    busy_[k] = 1;
  }

 private:
  Device& device_;
  size_t nbytes_;
  void* stream_ = nullptr;
  int previous_ = 0;
  bool bound_ = false;
  std::vector<unsigned char*> bufs_;
  std::vector<void*> events_;
  std::vector<char> busy_;
};

size_t worker_count(const StagingOptions& o, size_t nbatches) {
  size_t w = std::max<size_t>(1, o.num_threads);
  return std::min(w, nbatches);
}

void check_options(const StagingOptions& o) {
  if (o.staging_nbytes < 4096) throw std::invalid_argument("staging_nbytes must be at least 4096");
  if (o.staging_buffers < 1) throw std::invalid_argument("staging_buffers must be at least 1");
}

// Runs fn(lane) on each worker; the first exception stops the others (they check
// `stop` between batches) and is rethrown once every lane has been torn down.
template <typename Fn>
void run_lanes(Device& device, const StagingOptions& o, size_t nbatches, Fn fn) {
  std::atomic<bool> stop{false};
  size_t workers = worker_count(o, nbatches);
  const std::thread::id caller = std::this_thread::get_id();
  default_pool().parallel_for(workers, workers, [&](size_t, size_t) {
    Lane lane(device, o.staging_nbytes);
    try {
      // A small transfer pins little.
      lane.open(std::min(o.staging_buffers, nbatches), std::this_thread::get_id() == caller);
      fn(lane, stop);
      device.synchronize(lane.stream());
    } catch (...) {
      stop.store(true);
      throw;
    }
  });
}

}  // namespace

std::vector<uint32_t> read_to_device(Device& device, int fd, const std::vector<Region>& given,
                                     const std::vector<ZeroRange>& zeros, const StagingOptions& options,
                                     const std::string& path) {
  check_options(options);
  const FileOrder order(given);
  const std::vector<Region>& regions = order.regions();
  check_sorted(regions);
  const Plan plan = make_plan(regions, zeros, options.staging_nbytes);
  std::vector<uint32_t> piece_crcs(plan.pieces.size(), 0);
  std::unique_ptr<cufile::FileHandle> gds;
  cufile::BufferRegistrations registered;  // outlives every lane: deregistered after the last transfer
  if (options.gds_fd >= 0) {
    gds = std::make_unique<cufile::FileHandle>(options.gds_fd, path);
    register_buffers(registered, regions);
  }
  std::atomic<size_t> next{0};
  const size_t n = plan.batches.size();

  run_lanes(device, options, n, [&](Lane& lane, std::atomic<bool>& stop) {
    Device& dev = lane.device();
    size_t uses = 0;
    while (!stop.load()) {
      size_t b = next.fetch_add(1);
      if (b >= n) break;
      const Batch& batch = plan.batches[b];
      size_t k = uses++ % lane.count();
      lane.reclaim(k);  // back-pressure: the buffer's previous copy must be done
      unsigned char* buf = lane.buf(k);
      if (!gds) {
        pread_full(fd, buf, batch.file_end - batch.file_begin, batch.file_begin, path);
        for (size_t i = batch.first; i < batch.last; i++) {
          const Piece& p = plan.pieces[i];
          const unsigned char* src = buf + p.batch_offset;
          if (p.region == kZeroPiece) {
            require_zero(src, p.nbytes, batch.file_begin + p.batch_offset, path);
            continue;
          }
          if (options.checksum) piece_crcs[i] = checksum(options.zip_crc, src, p.nbytes);
          dev.copy_async(reinterpret_cast<void*>(regions[p.region].ptr + p.region_offset), src, p.nbytes,
                         CopyKind::kHostToDevice, lane.stream());
        }
        lane.mark(k);
        continue;
      }
      // GPUDirect: the data goes straight to the device; for the checksum it comes
      // back through the staging buffer, on the otherwise idle device-to-host direction.
      for (size_t i = batch.first; i < batch.last; i++) {
        const Piece& p = plan.pieces[i];
        uint64_t at = batch.file_begin + p.batch_offset;
        if (p.region == kZeroPiece) {
          pread_full(fd, buf + p.batch_offset, p.nbytes, at, path);
          require_zero(buf + p.batch_offset, p.nbytes, at, path);
          continue;
        }
        void* base = reinterpret_cast<void*>(regions[p.region].ptr);
        cufile::read_full(*gds, base, p.nbytes, at, p.region_offset, path);
        if (options.checksum) {
          dev.copy_async(buf + p.batch_offset, static_cast<unsigned char*>(base) + p.region_offset, p.nbytes,
                         CopyKind::kDeviceToHost, lane.stream());
        }
      }
      if (!options.checksum) continue;
      lane.mark(k);
      lane.reclaim(k);
      for (size_t i = batch.first; i < batch.last; i++) {
        const Piece& p = plan.pieces[i];
        if (p.region != kZeroPiece) piece_crcs[i] = checksum(options.zip_crc, buf + p.batch_offset, p.nbytes);
      }
    }
  });
  if (!options.checksum) return std::vector<uint32_t>(regions.size(), 0);
  return order.restore(fold(regions, plan, piece_crcs, options));
}

std::vector<uint32_t> write_from_device(Device& device, int fd, const std::vector<Region>& regions,
                                        const StagingOptions& options, const std::string& path) {
  check_options(options);
  check_sorted(regions);
  const Plan plan = make_plan(regions, {}, options.staging_nbytes);
  std::vector<uint32_t> piece_crcs(plan.pieces.size(), 0);
  std::unique_ptr<cufile::FileHandle> gds;
  cufile::BufferRegistrations registered;  // outlives every lane: deregistered after the last transfer
  if (options.gds_fd >= 0) {
    gds = std::make_unique<cufile::FileHandle>(options.gds_fd, path);
    register_buffers(registered, regions);
  }
  std::atomic<size_t> next{0};
  const size_t n = plan.batches.size();

  run_lanes(device, options, n, [&](Lane& lane, std::atomic<bool>& stop) {
    Device& dev = lane.device();
    std::deque<std::pair<size_t, size_t>> inflight;  // (batch, slot), oldest first
    std::vector<size_t> free_slots;
    for (size_t k = lane.count(); k-- > 0;) free_slots.push_back(k);
    bool exhausted = false;
    for (;;) {
      // Queue device-to-host copies into every free buffer, then drain the oldest: the
      // copies of later batches run while this one is checksummed and written.
      while (!exhausted && !stop.load() && !free_slots.empty()) {
        size_t b = next.fetch_add(1);
        if (b >= n) {
          exhausted = true;
          break;
        }
        size_t k = free_slots.back();
        free_slots.pop_back();
        const Batch& batch = plan.batches[b];
        unsigned char* buf = lane.buf(k);
        uint64_t cursor = 0;
        for (size_t i = batch.first; i < batch.last; i++) {
          const Piece& p = plan.pieces[i];
          if (p.batch_offset > cursor) std::memset(buf + cursor, 0, p.batch_offset - cursor);  // a bridged gap
          cursor = p.batch_offset + p.nbytes;
          dev.copy_async(buf + p.batch_offset, reinterpret_cast<const void*>(regions[p.region].ptr + p.region_offset),
                         p.nbytes, CopyKind::kDeviceToHost, lane.stream());
        }
        lane.mark(k);
        inflight.emplace_back(b, k);
      }
      if (inflight.empty() || stop.load()) break;
      auto [b, k] = inflight.front();
      inflight.pop_front();
      lane.reclaim(k);
      const Batch& batch = plan.batches[b];
      const unsigned char* buf = lane.buf(k);
      for (size_t i = batch.first; i < batch.last; i++) {
        const Piece& p = plan.pieces[i];
        if (options.checksum) piece_crcs[i] = checksum(options.zip_crc, buf + p.batch_offset, p.nbytes);
        if (gds) {
          cufile::write_full(*gds, reinterpret_cast<const void*>(regions[p.region].ptr), p.nbytes,
                             batch.file_begin + p.batch_offset, p.region_offset, path);
        }
      }
      if (!gds) pwrite_full(fd, buf, batch.file_end - batch.file_begin, batch.file_begin, path);
      free_slots.push_back(k);
    }
  });
  return options.checksum ? fold(regions, plan, piece_crcs, options) : std::vector<uint32_t>(regions.size(), 0);
}

}  // namespace tensorfile
