// A countdown on file.hpp's write hook (see write_faults.hpp).
#include "testing/write_faults.hpp"

#include <atomic>

#include "file.hpp"

namespace tensorfile::testing {

namespace {

std::atomic<uint64_t> g_countdown{0};
std::atomic<int> g_errno{0};

int countdown_hook() noexcept {
  uint64_t c = g_countdown.load();
  while (c > 0 && !g_countdown.compare_exchange_weak(c, c - 1)) {
  }
  return c == 1 ? g_errno.load() : 0;
}

}  // namespace

void inject_write_fault(uint64_t countdown, int error_number) {
  g_errno.store(error_number);
  g_countdown.store(countdown);
  set_write_hook(countdown ? &countdown_hook : nullptr);
}

}  // namespace tensorfile::testing
