// Fault injection for tests: makes a chosen write fail, as a full or failing disk would.
#pragma once

#include <cstdint>

namespace tensorfile::testing {

// Makes the `countdown`-th following write (1 = the next one) fail with `error_number`;
// countdown 0 disarms. Process-wide; thread safe.
void inject_write_fault(uint64_t countdown, int error_number);

}  // namespace tensorfile::testing
