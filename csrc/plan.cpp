#include "plan.hpp"

#include <algorithm>
#include <limits>
#include <unordered_map>

namespace tensorfile {

bool tensor_end(int64_t first, int64_t itemsize, const int64_t* shape, const int64_t* stride, int64_t ndim,
                int64_t* end, bool* empty) {
  int64_t reach = 0;  // sum of (d - 1) * stride: the last element's index
  *empty = false;
  for (int64_t k = 0; k < ndim; k++) {
    if (shape[k] == 0) *empty = true;
    int64_t step = 0;
    if (__builtin_mul_overflow(shape[k] - 1, stride[k], &step) || __builtin_add_overflow(reach, step, &reach)) {
      if (shape[k] != 0) return false;
    }
  }
  if (*empty) {
    *end = first;
    return true;
  }
  int64_t bytes = 0;
  return !__builtin_add_overflow(reach, 1, &reach) && !__builtin_mul_overflow(reach, itemsize, &bytes) &&
         !__builtin_add_overflow(first, bytes, end);
}

StorageGroups group_storages(const TensorSpans& t, int64_t align) {
  const size_t n = t.first.size();
  StorageGroups g;
  g.storage.resize(n);
  g.offset.resize(n);

  // Most state dicts share nothing: then each tensor is its own storage, in order.
  std::vector<uint64_t> keys;
  keys.reserve(n);
  for (uint64_t s : t.storage) {
    if (s != 0) keys.push_back(s);
  }
  std::sort(keys.begin(), keys.end());
  const bool shared = std::adjacent_find(keys.begin(), keys.end()) != keys.end();
  if (!shared) {
    for (size_t i = 0; i < n; i++) g.storage[i] = static_cast<int64_t>(i);
  } else {
    std::unordered_map<uint64_t, int64_t> index;
    index.reserve(keys.size());
    int64_t next = 0;
    for (size_t i = 0; i < n; i++) {
      const uint64_t s = t.storage[i];
      if (s == 0) {
        g.storage[i] = next++;
        continue;
      }
      auto [it, added] = index.try_emplace(s, next);
      if (added) next++;
      g.storage[i] = it->second;
    }
  }
  const size_t count = shared ? static_cast<size_t>(*std::max_element(g.storage.begin(), g.storage.end()) + 1) : n;
  g.lead.assign(count, -1);
  std::vector<int64_t> lo(count, std::numeric_limits<int64_t>::max()), hi(count, 0);
  for (size_t i = 0; i < n; i++) {
    const auto s = static_cast<size_t>(g.storage[i]);
    if (g.lead[s] < 0) g.lead[s] = static_cast<int64_t>(i);
    if (t.end[i] > t.first[i]) {
      lo[s] = std::min(lo[s], t.first[i]);
      hi[s] = std::max(hi[s], t.end[i]);
    }
  }
  g.ptrs.resize(count);
  g.nbytes.resize(count);
  for (size_t s = 0; s < count; s++) {
    if (hi[s] == 0) lo[s] = 0;  // no tensor has bytes in it: an empty span
    lo[s] -= lo[s] % align;
    g.nbytes[s] = static_cast<uint64_t>(hi[s] - lo[s]);
    g.ptrs[s] = t.storage[static_cast<size_t>(g.lead[s])] + static_cast<uint64_t>(lo[s]);
  }
  for (size_t i = 0; i < n; i++) {
    const auto s = static_cast<size_t>(g.storage[i]);
    const int64_t off = t.first[i] - lo[s];
    g.offset[i] = (off < 0 || static_cast<uint64_t>(off) > g.nbytes[s]) ? 0 : off;
  }
  return g;
}

}  // namespace tensorfile
