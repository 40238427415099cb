// The fast header decoder: a strict JSON scanner over the canonical header layout and
// the validation rules of docs/format.md ("Validation"), mirrored from the reference
// validator in formats/native.py. Anything unusual declines rather than guesses.
#include "header.hpp"

#include <charconv>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string_view>
#include <unordered_map>
#include <unordered_set>

namespace tensorfile {
namespace {

constexpr int64_t kMaxInt = INT64_MAX;  // 2^63 - 1
constexpr uint64_t kAlign = 4096;
constexpr uint64_t kPreambleNbytes = 32;
constexpr size_t kMaxNdim = 64;
constexpr int kMaxTreeDepth = 100;  // the format allows 200; deeper trees take the full validator
constexpr int64_t kSafeInt = int64_t{1} << 53;

// Thrown inside the decoder to decline; never escapes decode_header.
struct Decline {};

[[noreturn]] void decline() { throw Decline{}; }

struct TreeRef {
  int64_t index;
  int8_t kind;  // 0 "tensor" (a torch row), 1 "ndarray" (a numpy row)
};

class Scanner {
 public:
  Scanner(const char* data, size_t nbytes) : p_(data), begin_(data), end_(data + nbytes) {}

  size_t pos() const { return static_cast<size_t>(p_ - begin_); }
  bool at_end() const { return p_ == end_; }
  char peek() const { return p_ < end_ ? *p_ : '\0'; }

  void expect(char c) {
    if (p_ >= end_ || *p_ != c) decline();
    ++p_;
  }
  bool accept(char c) {
    if (p_ < end_ && *p_ == c) {
      ++p_;
      return true;
    }
    return false;
  }
  void expect_literal(std::string_view s) {
    if (static_cast<size_t>(end_ - p_) < s.size() || std::memcmp(p_, s.data(), s.size()) != 0) decline();
    p_ += s.size();
  }

  // A string of printable ASCII without escapes: its bytes are its value.
  std::string_view string() {
    expect('"');
    const char* start = p_;
    while (p_ < end_) {
      const unsigned char c = static_cast<unsigned char>(*p_);
      if (c == '"') {
        std::string_view out(start, static_cast<size_t>(p_ - start));
        ++p_;
        return out;
      }
      if (c == '\\' || c < 0x20 || c >= 0x7f) decline();
      ++p_;
    }
    decline();
  }

  // A JSON number that must be an int (no fraction or exponent) of at most 18 digits,
  // so it fits an int64 without overflow checks; longer ones decline.
  int64_t integer() {
    const bool negative = accept('-');
    const char* start = p_;
    int64_t v = 0;
    while (p_ < end_ && *p_ >= '0' && *p_ <= '9') {
      v = v * 10 + (*p_ - '0');
      ++p_;
      if (p_ - start > 18) decline();
    }
    const auto digits = p_ - start;
    if (digits == 0 || (digits > 1 && *start == '0')) decline();
    if (p_ < end_ && (*p_ == '.' || *p_ == 'e' || *p_ == 'E')) decline();
    return negative ? -v : v;
  }

  int64_t index() {  // an int in [0, 2^63)
    if (peek() == '-') decline();
    return integer();
  }

  // Any JSON number; ints must fit in 53 bits and floats must be finite, as plain tree
  // values must.
  void plain_number() {
    const char* start = p_;
    accept('-');
    const char* digits = p_;
    while (p_ < end_ && *p_ >= '0' && *p_ <= '9') ++p_;
    if (p_ == digits || (p_ - digits > 1 && *digits == '0')) decline();
    bool is_float = false;
    if (accept('.')) {
      is_float = true;
      const char* frac = p_;
      while (p_ < end_ && *p_ >= '0' && *p_ <= '9') ++p_;
      if (p_ == frac) decline();
    }
    if (p_ < end_ && (*p_ == 'e' || *p_ == 'E')) {
      is_float = true;
      ++p_;
      if (!accept('+')) accept('-');
      const char* exp = p_;
      while (p_ < end_ && *p_ >= '0' && *p_ <= '9') ++p_;
      if (p_ == exp) decline();
    }
    const std::string text(start, static_cast<size_t>(p_ - start));
    if (is_float) {
      if (!std::isfinite(std::strtod(text.c_str(), nullptr))) decline();
    } else {
      if (p_ - digits > 16) decline();
      const long long v = std::strtoll(text.c_str(), nullptr, 10);
      if (v > kSafeInt || v < -kSafeInt) decline();
    }
  }

 private:
  const char* p_;
  const char* begin_;
  const char* end_;
};

// The object tree, restricted to null/bool/string/number scalars, tensor and ndarray
// references, list, tuple, dict and odict (without attributes) nodes, and dict keys
// that are strings or ints. Records every reference; checks key uniqueness per node.
void scan_tree(Scanner& sc, int depth, std::vector<TreeRef>& refs) {
  const char c = sc.peek();
  if (c == '"') {
    sc.string();
    return;
  }
  if (c == 'n') return sc.expect_literal("null");
  if (c == 't') return sc.expect_literal("true");
  if (c == 'f') return sc.expect_literal("false");
  if (c == '-' || (c >= '0' && c <= '9')) return sc.plain_number();
  if (c != '[' || depth > kMaxTreeDepth) decline();
  sc.expect('[');
  const std::string_view tag = sc.string();
  if (tag == "tensor" || tag == "ndarray") {
    sc.expect(',');
    refs.push_back(TreeRef{sc.index(), static_cast<int8_t>(tag == "tensor" ? 0 : 1)});
    sc.expect(']');
    return;
  }
  if (tag == "list" || tag == "tuple") {
    while (sc.accept(',')) scan_tree(sc, depth + 1, refs);
    sc.expect(']');
    return;
  }
  if (tag != "dict" && tag != "odict") decline();
  if (tag == "odict") {
    sc.expect(',');
    sc.expect_literal("null");
  }
  std::unordered_set<std::string_view> str_keys;
  std::unordered_set<int64_t> int_keys;
  while (sc.accept(',')) {
    const char k = sc.peek();
    if (k == '"') {
      if (!str_keys.insert(sc.string()).second) decline();
    } else if (k == '-' || (k >= '0' && k <= '9')) {
      const int64_t v = sc.integer();
      if (v > kSafeInt || v < -kSafeInt || !int_keys.insert(v).second) decline();
    } else {
      decline();
    }
    sc.expect(',');
    scan_tree(sc, depth + 1, refs);
  }
  sc.expect(']');
}

bool valid_device(std::string_view s) {
  if (s == "cpu" || s == "cuda") return true;
  if (s.substr(0, 5) != "cuda:") return false;
  const std::string_view digits = s.substr(5);
  if (digits.empty() || digits.size() > 5) return false;
  if (digits.size() > 1 && digits[0] == '0') return false;
  for (char d : digits)
    if (d < '0' || d > '9') return false;
  return true;
}

uint64_t align_up(uint64_t n) { return (n + kAlign - 1) & ~(kAlign - 1); }

int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

using I128 = __int128;

// Adds with a bound far below __int128's range, so sums of up to 64 terms never overflow.
constexpr I128 kBound = static_cast<I128>(1) << 100;

void bounded(I128 v) {
  if (v > kBound || v < -kBound) decline();
}

void decode(const char* data, size_t nbytes, uint64_t file_nbytes, const std::vector<DtypeInfo>& dtypes,
            HeaderTables& out) {
  Scanner sc(data, nbytes);
  std::vector<TreeRef> refs;

  sc.expect_literal("{\"tree\":");
  out.tree_begin = sc.pos();
  scan_tree(sc, 0, refs);
  out.tree_end = sc.pos();

  // Tensors: [kind, storage, dtype, shape, strides, offset, flags]; storage indexes and
  // sizes are checked once the storages are known.
  std::unordered_map<std::string_view, int> dtype_index[2];
  for (size_t i = 0; i < dtypes.size(); i++) {
    dtype_index[dtypes[i].kind].emplace(dtypes[i].name, static_cast<int>(i));
  }
  std::vector<I128> tensor_end;  // byte end of each tensor within its storage
  std::vector<bool> tensor_nonempty;
  sc.expect_literal(",\"tensors\":[");
  if (!sc.accept(']')) {
    do {
      sc.expect('[');
      const std::string_view kind_name = sc.string();
      int kind;
      if (kind_name == "torch")
        kind = 0;
      else if (kind_name == "numpy")
        kind = 1;
      else
        decline();
      sc.expect(',');
      const int64_t storage = sc.index();
      sc.expect(',');
      const auto found = dtype_index[kind].find(sc.string());
      if (found == dtype_index[kind].end()) decline();
      const DtypeInfo& dt = dtypes[static_cast<size_t>(found->second)];
      const size_t first_dim = out.shapes.size();
      sc.expect(',');
      sc.expect('[');
      if (!sc.accept(']')) {
        do {
          out.shapes.push_back(sc.index());
        } while (sc.accept(','));
        sc.expect(']');
      }
      sc.expect(',');
      sc.expect('[');
      if (!sc.accept(']')) {
        do {
          const int64_t st = sc.integer();
          if (kind == 0 && st < 0) decline();
          out.strides.push_back(st);
        } while (sc.accept(','));
        sc.expect(']');
      }
      const size_t ndim = out.shapes.size() - first_dim;
      if (out.strides.size() != out.shapes.size() || ndim > kMaxNdim) decline();
      sc.expect(',');
      const int64_t offset = sc.index();
      sc.expect(',');
      const int64_t flags = sc.integer();
      sc.expect(']');
      if (flags < 0 || flags > 3 || (kind == 1 && flags != 0)) decline();
      if ((flags & 1) && !dt.grad_ok) decline();

      const auto itemsize = static_cast<I128>(dt.itemsize);
      I128 numel = 1, lo = 0, hi = 0;
      for (size_t d = first_dim; d < out.shapes.size(); d++) {
        const I128 n = out.shapes[d], st = out.strides[d];
        numel *= n;
        if (numel > kMaxInt) numel = static_cast<I128>(kMaxInt) + 1;  // stays over the limit
        if (n) {
          const I128 reach = (n - 1) * st;
          (reach < 0 ? lo : hi) += reach;
          bounded(lo);
          bounded(hi);
        }
      }
      // A zero dimension empties the tensor whatever came before it.
      for (size_t d = first_dim; d < out.shapes.size(); d++)
        if (out.shapes[d] == 0) numel = 0;
      if (numel > kMaxInt) decline();
      if (kind == 0) {
        if (offset % static_cast<int64_t>(dt.itemsize)) decline();
        lo *= itemsize;
        hi *= itemsize;
      }
      const I128 end = numel ? offset + hi + itemsize : static_cast<I128>(offset);
      if (numel && offset + lo < 0) decline();
      tensor_end.push_back(end);
      tensor_nonempty.push_back(numel != 0);
      out.tensors.insert(out.tensors.end(), {kind, storage, static_cast<int64_t>(found->second),
                                             static_cast<int64_t>(ndim), offset, flags});
    } while (sc.accept(','));
    sc.expect(']');
  }
  const size_t ntensors = tensor_end.size();

  // Storages: [offset, nbytes, device], laid out canonically.
  sc.expect_literal(",\"storages\":[");
  uint64_t cursor = 0, data_end = 0;
  std::unordered_map<std::string_view, int32_t> device_index;
  if (!sc.accept(']')) {
    do {
      sc.expect('[');
      const auto offset = static_cast<uint64_t>(sc.index());
      sc.expect(',');
      const auto nb = static_cast<uint64_t>(sc.index());
      sc.expect(',');
      const std::string_view device = sc.string();
      sc.expect(']');
      if (offset != cursor || !valid_device(device)) decline();
      const uint64_t stop = offset + nb;  // both < 2^63: no wrap
      if (stop > static_cast<uint64_t>(kMaxInt) - kAlign) decline();
      cursor = align_up(stop);
      if (nb) data_end = stop;
      auto [it, added] = device_index.emplace(device, static_cast<int32_t>(out.devices.size()));
      if (added) out.devices.emplace_back(device);
      out.storage_offsets.push_back(offset);
      out.storage_nbytes.push_back(nb);
      out.storage_device.push_back(it->second);
    } while (sc.accept(','));
    sc.expect(']');
  }
  const size_t nstorage = out.storage_nbytes.size();
  const uint64_t data_start = align_up(kPreambleNbytes + nbytes);
  const uint64_t expected_end = data_end ? data_start + data_end : kPreambleNbytes + nbytes;
  if (expected_end != file_nbytes) decline();

  // Metadata: an object of strings to strings, without duplicate keys.
  sc.expect_literal(",\"metadata\":");
  out.metadata_begin = sc.pos();
  sc.expect('{');
  if (!sc.accept('}')) {
    std::unordered_set<std::string_view> keys;
    do {
      if (!keys.insert(sc.string()).second) decline();
      sc.expect(':');
      sc.string();
    } while (sc.accept(','));
    sc.expect('}');
  }
  out.metadata_end = sc.pos();

  sc.expect_literal(",\"crc32c\":\"");
  out.storage_crcs.resize(nstorage);
  for (size_t s = 0; s < nstorage; s++) {
    uint32_t crc = 0;
    for (int k = 0; k < 8; k++) {
      const int h = hex_digit(sc.peek());
      if (h < 0) decline();
      sc.expect(sc.peek());
      crc = (crc << 4) | static_cast<uint32_t>(h);
    }
    out.storage_crcs[s] = crc;
  }
  sc.expect_literal("\"}");
  if (!sc.at_end()) decline();

  // Cross-checks: tensors against storages, storages against their tensors, the tree
  // against the tensor rows.
  out.storage_kind.assign(nstorage, -1);
  std::vector<I128> need(nstorage, 0);
  for (size_t i = 0; i < ntensors; i++) {
    const int64_t* row = &out.tensors[6 * i];
    const auto kind = static_cast<int8_t>(row[0]);
    if (row[1] < 0 || static_cast<uint64_t>(row[1]) >= nstorage) decline();
    const auto s = static_cast<size_t>(row[1]);
    if (tensor_end[i] > static_cast<I128>(out.storage_nbytes[s])) decline();
    if (out.storage_kind[s] == -1)
      out.storage_kind[s] = kind;
    else if (out.storage_kind[s] != kind)
      decline();
    if (tensor_nonempty[i] && tensor_end[i] > need[s]) need[s] = tensor_end[i];
  }
  for (size_t s = 0; s < nstorage; s++) {
    if (out.storage_kind[s] == -1 || need[s] != static_cast<I128>(out.storage_nbytes[s])) decline();
  }
  std::vector<bool> referenced(ntensors, false);
  size_t distinct = 0;
  for (const TreeRef& r : refs) {
    if (r.index < 0 || static_cast<uint64_t>(r.index) >= ntensors) decline();
    const auto i = static_cast<size_t>(r.index);
    if (out.tensors[6 * i] != r.kind) decline();
    if (!referenced[i]) {
      referenced[i] = true;
      distinct++;
    }
  }
  if (distinct != ntensors) decline();
}

void append_int(std::string& out, int64_t v) {
  char buf[24];
  const auto res = std::to_chars(buf, buf + sizeof(buf), v);
  out.append(buf, res.ptr);
}

void append_uint(std::string& out, uint64_t v) {
  char buf[24];
  const auto res = std::to_chars(buf, buf + sizeof(buf), v);
  out.append(buf, res.ptr);
}

void append_name(std::string& out, const std::vector<std::string>& names, int64_t i) {
  if (i < 0 || static_cast<uint64_t>(i) >= names.size()) throw std::invalid_argument("name index out of range");
  out += '"';
  out += names[static_cast<size_t>(i)];
  out += '"';
}

}  // namespace

std::string encode_tensor_rows(const TensorColumns& t, const std::vector<std::string>& dtype_names) {
  static const std::vector<std::string> kKinds = {"torch", "numpy"};
  std::string out;
  out.reserve(t.count * 48 + 2);
  out += '[';
  for (size_t i = 0; i < t.count; i++) {
    if (i) out += ',';
    out += '[';
    append_name(out, kKinds, t.kind[i]);
    out += ',';
    append_int(out, t.storage[i]);
    out += ',';
    append_name(out, dtype_names, t.dtype[i]);
    const int64_t begin = t.dim_begin[i], n = t.ndim[i];
    if (begin < 0 || n < 0 || static_cast<uint64_t>(begin) + static_cast<uint64_t>(n) > t.dims) {
      throw std::invalid_argument("tensor dims out of range");
    }
    for (const int64_t* dims : {t.shapes, t.strides}) {
      out += ",[";
      for (int64_t d = 0; d < n; d++) {
        if (d) out += ',';
        append_int(out, dims[begin + d]);
      }
      out += ']';
    }
    out += ',';
    append_int(out, t.offset[i]);
    out += ',';
    append_int(out, t.flags[i]);
    out += ']';
  }
  out += ']';
  return out;
}

std::string encode_storage_rows(size_t count, const uint64_t* offsets, const uint64_t* nbytes, const int32_t* device,
                                const std::vector<std::string>& devices) {
  std::string out;
  out.reserve(count * 24 + 2);
  out += '[';
  for (size_t i = 0; i < count; i++) {
    if (i) out += ',';
    out += '[';
    append_uint(out, offsets[i]);
    out += ',';
    append_uint(out, nbytes[i]);
    out += ',';
    append_name(out, devices, device[i]);
    out += ']';
  }
  out += ']';
  return out;
}

bool decode_header(const char* data, size_t nbytes, uint64_t file_nbytes, const std::vector<DtypeInfo>& dtypes,
                   HeaderTables& out) {
  try {
    decode(data, nbytes, file_nbytes, dtypes, out);
    return true;
  } catch (const Decline&) {
    out = HeaderTables{};
    return false;
  }
}

}  // namespace tensorfile
