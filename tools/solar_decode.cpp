// solar_decode: the SOLAR edge decoder, without Python.
//
//   solar_decode PACKAGE.safetensors BASE OUT_DIR
//
// Does what `subspace_ext.solar.decompress(PACKAGE, BASE).save_adapter(OUT_DIR)` does: reads and
// verifies the package (format, version, digest), regenerates each layer's basis from the base
// weight (BASE: a .safetensors file or a folder of them) through the subspace_ext::solar_basis op,
// decodes the coefficients through subspace_ext::solar_decode, checks the basis checksum, and writes
// a standard peft folder (adapter_config.json + adapter_model.safetensors). Layers stored as low-rank
// factors (format version 2, `--method lowrank|auto`) are checked against the base weight's
// fingerprint and written as they are (zero pairs up to the layer's rank), without a basis.
// Values or factors stored as int8 codes (format version 3, `--storage int8`) are decoded as
// codes * their float32 scales ("<tensor>_scale"), as solar._dequantize does.
//
// Self-contained apart from libtorch: the safetensors reader/writer, the JSON parser/writer (Python
// json.dump(indent=2) output with the keys sorted but inside the pattern dicts, as peft writes adapter_config.json)
// and SHA-256 are implemented here.
//
// Exit codes: 0 success, 1 error (one line on stderr), 2 usage error.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <algorithm>
#include <array>
#include <bit>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

// safetensors stores little-endian numbers; the reader copies file bytes into tensors as they are.
static_assert(std::endian::native == std::endian::little, "solar_decode reads safetensors on little-endian hosts only");

namespace fs = std::filesystem;

namespace {

// An error to report: one line, exit code 1.
struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] void fail(const std::string& msg) { throw Failure(msg); }

// =================================================================================================
// SHA-256 (FIPS 180-4)

class Sha256 {
 public:
  Sha256() { reset(); }

  void reset() {
    static constexpr uint32_t kInit[8] = {0x6a09e667u, 0xbb67ae85u, 0x3c6ef372u, 0xa54ff53au,
                                          0x510e527fu, 0x9b05688cu, 0x1f83d9abu, 0x5be0cd19u};
    std::memcpy(h_, kInit, sizeof(h_));
    length_ = 0;
    buffered_ = 0;
  }

  void update(const void* data, size_t n) {
    const auto* p = static_cast<const uint8_t*>(data);
    length_ += n;
    if (buffered_ > 0) {
      const size_t take = std::min(n, size_t{64} - buffered_);
      std::memcpy(buffer_ + buffered_, p, take);
      buffered_ += take;
      p += take;
      n -= take;
      if (buffered_ < 64) return;
      block(buffer_);
      buffered_ = 0;
    }
    for (; n >= 64; p += 64, n -= 64) block(p);
    if (n > 0) {
      std::memcpy(buffer_, p, n);
      buffered_ = n;
    }
  }

  void update(const std::string& s) { update(s.data(), s.size()); }

  // Finishes the hash (the object must be reset before reuse); lower-case hex.
  std::string hexdigest() {
    const uint64_t bits = length_ * 8;
    uint8_t pad[72] = {0x80};
    const size_t padlen = (buffered_ < 56 ? 56 : 120) - buffered_;
    update(pad, padlen);
    uint8_t len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(bits >> (56 - 8 * i));
    update(len, 8);
    static const char* hex = "0123456789abcdef";
    std::string out;
    for (uint32_t w : h_) {
      for (int shift = 28; shift >= 0; shift -= 4) out += hex[(w >> shift) & 0xf];
    }
    return out;
  }

 private:
  static uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

  void block(const uint8_t* p) {
    static constexpr uint32_t k[64] = {
        0x428a2f98u, 0x71374491u, 0xb5c0fbcfu, 0xe9b5dba5u, 0x3956c25bu, 0x59f111f1u, 0x923f82a4u,
        0xab1c5ed5u, 0xd807aa98u, 0x12835b01u, 0x243185beu, 0x550c7dc3u, 0x72be5d74u, 0x80deb1feu,
        0x9bdc06a7u, 0xc19bf174u, 0xe49b69c1u, 0xefbe4786u, 0x0fc19dc6u, 0x240ca1ccu, 0x2de92c6fu,
        0x4a7484aau, 0x5cb0a9dcu, 0x76f988dau, 0x983e5152u, 0xa831c66du, 0xb00327c8u, 0xbf597fc7u,
        0xc6e00bf3u, 0xd5a79147u, 0x06ca6351u, 0x14292967u, 0x27b70a85u, 0x2e1b2138u, 0x4d2c6dfcu,
        0x53380d13u, 0x650a7354u, 0x766a0abbu, 0x81c2c92eu, 0x92722c85u, 0xa2bfe8a1u, 0xa81a664bu,
        0xc24b8b70u, 0xc76c51a3u, 0xd192e819u, 0xd6990624u, 0xf40e3585u, 0x106aa070u, 0x19a4c116u,
        0x1e376c08u, 0x2748774cu, 0x34b0bcb5u, 0x391c0cb3u, 0x4ed8aa4au, 0x5b9cca4fu, 0x682e6ff3u,
        0x748f82eeu, 0x78a5636fu, 0x84c87814u, 0x8cc70208u, 0x90befffau, 0xa4506cebu, 0xbef9a3f7u,
        0xc67178f2u};
    uint32_t w[64];
    for (int i = 0; i < 16; ++i) {
      w[i] = (uint32_t{p[4 * i]} << 24) | (uint32_t{p[4 * i + 1]} << 16) |
             (uint32_t{p[4 * i + 2]} << 8) | uint32_t{p[4 * i + 3]};
    }
    for (int i = 16; i < 64; ++i) {
      const uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      const uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h_[0], b = h_[1], c = h_[2], d = h_[3], e = h_[4], f = h_[5], g = h_[6], h = h_[7];
    for (int i = 0; i < 64; ++i) {
      const uint32_t S1 = rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25);
      const uint32_t ch = (e & f) ^ (~e & g);
      const uint32_t t1 = h + S1 + ch + k[i] + w[i];
      const uint32_t S0 = rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22);
      const uint32_t maj = (a & b) ^ (a & c) ^ (b & c);
      const uint32_t t2 = S0 + maj;
      h = g;
      g = f;
      f = e;
      e = d + t1;
      d = c;
      c = b;
      b = a;
      a = t1 + t2;
    }
    h_[0] += a;
    h_[1] += b;
    h_[2] += c;
    h_[3] += d;
    h_[4] += e;
    h_[5] += f;
    h_[6] += g;
    h_[7] += h;
  }

  uint32_t h_[8];
  uint64_t length_;
  uint8_t buffer_[64];
  size_t buffered_;
};

// =================================================================================================
// JSON: a value, a parser (Python json.loads rules: NaN/Infinity accepted, no control characters in
// strings, duplicate keys keep the last value) and Python json.dumps-compatible output.

struct Json {
  enum class Type { Null, Bool, Int, Float, String, Array, Object };
  Type type = Type::Null;
  bool boolean = false;
  std::string text;  // Int: the literal (normalised); String: UTF-8 (lone surrogates as WTF-8)
  double number = 0.0;  // Float; Int as a (correctly rounded) double
  std::vector<Json> items;
  std::vector<std::pair<std::string, Json>> members;  // insertion order

  static Json string(std::string s) {
    Json j;
    j.type = Type::String;
    j.text = std::move(s);
    return j;
  }
  static Json boolean_value(bool b) {
    Json j;
    j.type = Type::Bool;
    j.boolean = b;
    return j;
  }
  static Json integer(int64_t v) {
    Json j;
    j.type = Type::Int;
    j.text = std::to_string(v);
    j.number = static_cast<double>(v);
    return j;
  }
  static Json floating(double v) {
    Json j;
    j.type = Type::Float;
    j.number = v;
    return j;
  }
  static Json object() {
    Json j;
    j.type = Type::Object;
    return j;
  }

  bool is_number() const { return type == Type::Int || type == Type::Float; }

  const Json* find(const std::string& key) const {
    for (const auto& kv : members)
      if (kv.first == key) return &kv.second;
    return nullptr;
  }
  // Python dict assignment: replaces the value in place, or appends.
  void set(const std::string& key, Json value) {
    for (auto& kv : members) {
      if (kv.first == key) {
        kv.second = std::move(value);
        return;
      }
    }
    members.emplace_back(key, std::move(value));
  }
};

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

class JsonParser {
 public:
  explicit JsonParser(const std::string& s) : s_(s) {}

  Json parse() {
    skip_ws();
    Json v = value(0);
    skip_ws();
    if (pos_ != s_.size()) error("extra data after the JSON value");
    return v;
  }

 private:
  static constexpr int kMaxDepth = 512;

  [[noreturn]] void error(const std::string& what) const {
    throw Failure("invalid JSON: " + what + " at offset " + std::to_string(pos_));
  }

  // A character for a message: printable ASCII as it is, any other byte as \xNN (the message is one
  // line of text, whatever bytes the file holds).
  static std::string shown(char c) {
    const auto u = static_cast<unsigned char>(c);
    if (u >= 0x20 && u < 0x7f) return std::string(1, c);
    static const char* kHex = "0123456789abcdef";
    return std::string("\\x") + kHex[u >> 4] + kHex[u & 15];
  }

  void skip_ws() {
    while (pos_ < s_.size() &&
           (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r'))
      ++pos_;
  }

  bool consume(const char* word) {
    const size_t n = std::strlen(word);
    if (s_.compare(pos_, n, word) == 0) {
      pos_ += n;
      return true;
    }
    return false;
  }

  Json value(int depth) {
    if (depth > kMaxDepth) error("nesting too deep");
    if (pos_ >= s_.size()) error("unexpected end of input");
    const char c = s_[pos_];
    if (c == '{') return object(depth);
    if (c == '[') return array(depth);
    if (c == '"') return Json::string(string());
    if (consume("true")) return Json::boolean_value(true);
    if (consume("false")) return Json::boolean_value(false);
    if (consume("null")) return Json();
    if (consume("NaN")) return Json::floating(std::nan(""));
    if (consume("Infinity")) return Json::floating(HUGE_VAL);
    if (consume("-Infinity")) return Json::floating(-HUGE_VAL);
    if (c == '-' || (c >= '0' && c <= '9')) return number();
    error("unexpected character '" + shown(c) + "'");
  }

  Json object(int depth) {
    ++pos_;  // '{'
    Json obj = Json::object();
    skip_ws();
    if (pos_ < s_.size() && s_[pos_] == '}') {
      ++pos_;
      return obj;
    }
    while (true) {
      skip_ws();
      if (pos_ >= s_.size() || s_[pos_] != '"') error("expected a string key");
      std::string key = string();
      skip_ws();
      if (pos_ >= s_.size() || s_[pos_] != ':') error("expected ':'");
      ++pos_;
      skip_ws();
      obj.set(key, value(depth + 1));
      skip_ws();
      if (pos_ >= s_.size()) error("unterminated object");
      if (s_[pos_] == ',') {
        ++pos_;
        continue;
      }
      if (s_[pos_] == '}') {
        ++pos_;
        return obj;
      }
      error("expected ',' or '}'");
    }
  }

  Json array(int depth) {
    ++pos_;  // '['
    Json arr;
    arr.type = Json::Type::Array;
    skip_ws();
    if (pos_ < s_.size() && s_[pos_] == ']') {
      ++pos_;
      return arr;
    }
    while (true) {
      skip_ws();
      arr.items.push_back(value(depth + 1));
      skip_ws();
      if (pos_ >= s_.size()) error("unterminated array");
      if (s_[pos_] == ',') {
        ++pos_;
        continue;
      }
      if (s_[pos_] == ']') {
        ++pos_;
        return arr;
      }
      error("expected ',' or ']'");
    }
  }

  uint32_t hex4() {
    if (pos_ + 4 > s_.size()) error("truncated \\u escape");
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      const char c = s_[pos_++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= static_cast<uint32_t>(c - '0');
      else if (c >= 'a' && c <= 'f') v |= static_cast<uint32_t>(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') v |= static_cast<uint32_t>(c - 'A' + 10);
      else error("invalid \\u escape");
    }
    return v;
  }

  // Strict UTF-8 (no overlong forms, no surrogates, at most U+10FFFF), as safetensors' own header
  // parser requires: a string that is not would be copied into a header nothing else can read.
  static bool valid_utf8(const std::string& s) {
    static const uint32_t kMin[] = {0, 0x80, 0x800, 0x10000};  // the smallest code point of each length
    for (size_t i = 0; i < s.size();) {
      const unsigned char c = static_cast<unsigned char>(s[i]);
      const int more = c < 0x80 ? 0 : (c >> 5) == 6 ? 1 : (c >> 4) == 14 ? 2 : (c >> 3) == 30 ? 3 : -1;
      if (more < 0 || s.size() - i <= static_cast<size_t>(more)) return false;
      uint32_t cp = more ? c & (0x3Fu >> more) : c;
      for (int k = 1; k <= more; ++k) {
        const unsigned char d = static_cast<unsigned char>(s[i + k]);
        if ((d >> 6) != 2) return false;
        cp = (cp << 6) | (d & 0x3Fu);
      }
      if (cp < kMin[more] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
      i += more + 1;
    }
    return true;
  }

  std::string string() {
    ++pos_;  // '"'
    std::string out;
    while (true) {
      if (pos_ >= s_.size()) error("unterminated string");
      const unsigned char c = static_cast<unsigned char>(s_[pos_++]);
      if (c == '"') {
        if (!valid_utf8(out)) error("a string is not valid UTF-8 (raw bytes, or an unpaired \\u surrogate escape)");
        return out;
      }
      if (c < 0x20) error("control character in a string");
      if (c != '\\') {
        out += static_cast<char>(c);
        continue;
      }
      if (pos_ >= s_.size()) error("unterminated string");
      const char e = s_[pos_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp = hex4();
          // A high surrogate followed by an escaped low surrogate is one code point (as Python).
          if (cp >= 0xD800 && cp <= 0xDBFF && pos_ + 6 <= s_.size() && s_[pos_] == '\\' &&
              s_[pos_ + 1] == 'u') {
            const size_t save = pos_;
            pos_ += 2;
            const uint32_t lo = hex4();
            if (lo >= 0xDC00 && lo <= 0xDFFF) cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            else pos_ = save;
          }
          append_utf8(out, cp);
          break;
        }
        default: error("invalid escape '\\" + shown(e) + "'");
      }
    }
  }

  Json number() {
    const size_t start = pos_;
    bool is_float = false;
    if (s_[pos_] == '-') ++pos_;
    if (pos_ >= s_.size() || !std::isdigit(static_cast<unsigned char>(s_[pos_])))
      error("invalid number");
    if (s_[pos_] == '0') {
      ++pos_;
    } else {
      while (pos_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[pos_]))) ++pos_;
    }
    // Python's scanner: a fraction / exponent only counts when digits follow; otherwise the number
    // ends there (and the leftover character is a syntax error in the caller).
    if (pos_ + 1 < s_.size() && s_[pos_] == '.' &&
        std::isdigit(static_cast<unsigned char>(s_[pos_ + 1]))) {
      is_float = true;
      pos_ += 1;
      while (pos_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[pos_]))) ++pos_;
    }
    if (pos_ < s_.size() && (s_[pos_] == 'e' || s_[pos_] == 'E')) {
      size_t p = pos_ + 1;
      if (p < s_.size() && (s_[p] == '+' || s_[p] == '-')) ++p;
      if (p < s_.size() && std::isdigit(static_cast<unsigned char>(s_[p]))) {
        is_float = true;
        while (p < s_.size() && std::isdigit(static_cast<unsigned char>(s_[p]))) ++p;
        pos_ = p;
      }
    }
    const std::string literal = s_.substr(start, pos_ - start);
    // Python's json refuses an integer literal of more than 4300 digits (its default
    // int_max_str_digits); so does this decoder, so both take the same headers.
    if (!is_float && literal.size() - (literal[0] == '-') > 4300)
      error("integer of more than 4300 digits (Python's limit for integer literals)");
    Json j;
    j.type = is_float ? Json::Type::Float : Json::Type::Int;
    j.number = std::strtod(literal.c_str(), nullptr);  // correctly rounded, as Python's float()
    j.text = (literal == "-0") ? "0" : literal;
    return j;
  }

  const std::string& s_;
  size_t pos_ = 0;
};

Json parse_json(const std::string& s) { return JsonParser(s).parse(); }

// Python's repr(float): shortest round-trip digits; fixed notation for 1e-4 <= |x| < 1e16.
std::string python_float_repr(double x) {
  if (std::isnan(x)) return "NaN";  // json.dumps spellings
  if (std::isinf(x)) return x > 0 ? "Infinity" : "-Infinity";
  if (x == 0.0) return std::signbit(x) ? "-0.0" : "0.0";
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof(buf), x, std::chars_format::scientific);
  std::string sci(buf, res.ptr);  // [-]d[.ddd]e[+-]XX
  std::string sign;
  if (sci[0] == '-') {
    sign = "-";
    sci.erase(0, 1);
  }
  const size_t epos = sci.find('e');
  std::string digits = sci.substr(0, epos);
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  const int exp10 = std::stoi(sci.substr(epos + 1));
  const int decpt = exp10 + 1;  // value = 0.DIGITS * 10^decpt
  const int nd = static_cast<int>(digits.size());
  std::string out = sign;
  if (decpt > -4 && decpt <= 16) {
    if (decpt <= 0) {
      out += "0." + std::string(static_cast<size_t>(-decpt), '0') + digits;
    } else if (decpt < nd) {
      out += digits.substr(0, static_cast<size_t>(decpt)) + "." + digits.substr(static_cast<size_t>(decpt));
    } else {
      out += digits + std::string(static_cast<size_t>(decpt - nd), '0') + ".0";
    }
  } else {
    out += digits.substr(0, 1);
    if (nd > 1) out += "." + digits.substr(1);
    const int e = decpt - 1;
    char ebuf[16];
    std::snprintf(ebuf, sizeof(ebuf), "e%c%02d", e < 0 ? '-' : '+', e < 0 ? -e : e);
    out += ebuf;
  }
  return out;
}

// Decodes UTF-8 (WTF-8 for lone surrogates) into code points; invalid bytes pass as U+FFFD.
std::vector<uint32_t> code_points(const std::string& s) {
  std::vector<uint32_t> out;
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    int n = 0;
    uint32_t cp = 0;
    if (c < 0x80) { cp = c; n = 1; }
    else if ((c & 0xE0) == 0xC0) { cp = c & 0x1F; n = 2; }
    else if ((c & 0xF0) == 0xE0) { cp = c & 0x0F; n = 3; }
    else if ((c & 0xF8) == 0xF0) { cp = c & 0x07; n = 4; }
    bool ok = n > 0 && i + static_cast<size_t>(n) <= s.size();
    for (int k = 1; ok && k < n; ++k) {
      const unsigned char cc = static_cast<unsigned char>(s[i + static_cast<size_t>(k)]);
      if ((cc & 0xC0) != 0x80) ok = false;
      else cp = (cp << 6) | (cc & 0x3F);
    }
    if (!ok) {
      out.push_back(0xFFFD);
      ++i;
      continue;
    }
    out.push_back(cp);
    i += static_cast<size_t>(n);
  }
  return out;
}

// json.dumps string with ensure_ascii=True.
std::string python_json_string(const std::string& s) {
  std::string out = "\"";
  char buf[16];
  auto u = [&](uint32_t v) {
    std::snprintf(buf, sizeof(buf), "\\u%04x", v);
    out += buf;
  };
  for (uint32_t cp : code_points(s)) {
    switch (cp) {
      case '"': out += "\\\""; continue;
      case '\\': out += "\\\\"; continue;
      case '\n': out += "\\n"; continue;
      case '\r': out += "\\r"; continue;
      case '\t': out += "\\t"; continue;
      case '\b': out += "\\b"; continue;
      case '\f': out += "\\f"; continue;
      default: break;
    }
    if (cp >= 0x20 && cp <= 0x7E) {
      out += static_cast<char>(cp);
    } else if (cp < 0x10000) {
      u(cp);
    } else {
      const uint32_t v = cp - 0x10000;
      u(0xD800 | (v >> 10));
      u(0xDC00 | (v & 0x3FF));
    }
  }
  return out + "\"";
}

// adapter_config.json as peft writes it (subspace_ext.io.config_json): json.dump(value, f, indent=2) with the keys
// sorted at every level, except inside the dicts under rank_pattern / alpha_pattern / paca_indices_pattern, whose
// order decides which pattern wins (``keep_order``: kept as the package gives them).
void python_json_dump(const Json& v, std::string& out, int level, bool keep_order = false) {
  const std::string inner(static_cast<size_t>(2 * (level + 1)), ' ');
  const std::string outer(static_cast<size_t>(2 * level), ' ');
  switch (v.type) {
    case Json::Type::Null: out += "null"; return;
    case Json::Type::Bool: out += v.boolean ? "true" : "false"; return;
    case Json::Type::Int: out += v.text; return;
    case Json::Type::Float: out += python_float_repr(v.number); return;
    case Json::Type::String: out += python_json_string(v.text); return;
    case Json::Type::Array: {
      if (v.items.empty()) {
        out += "[]";
        return;
      }
      out += "[";
      for (size_t i = 0; i < v.items.size(); ++i) {
        out += (i ? ",\n" : "\n") + inner;
        python_json_dump(v.items[i], out, level + 1, keep_order);
      }
      out += "\n" + outer + "]";
      return;
    }
    case Json::Type::Object: {
      if (v.members.empty()) {
        out += "{}";
        return;
      }
      // Byte order of UTF-8 = code point order, as Python's sorted() on str.
      std::vector<const std::pair<std::string, Json>*> sorted;
      for (const auto& kv : v.members) sorted.push_back(&kv);
      if (!keep_order)
        std::stable_sort(sorted.begin(), sorted.end(), [](auto* a, auto* b) { return a->first < b->first; });
      out += "{";
      for (size_t i = 0; i < sorted.size(); ++i) {
        const std::string& key = sorted[i]->first;
        out += (i ? ",\n" : "\n") + inner + python_json_string(key) + ": ";
        python_json_dump(sorted[i]->second, out, level + 1,
                         keep_order || key == "rank_pattern" || key == "alpha_pattern" || key == "paca_indices_pattern");
      }
      out += "\n" + outer + "}";
      return;
    }
  }
}

// Compact JSON string as serde_json writes it (safetensors headers): raw UTF-8, escapes for '"',
// '\\' and control characters.
std::string compact_json_string(const std::string& s) {
  std::string out = "\"";
  char buf[16];
  for (const char ch : s) {
    const unsigned char c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20) {
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += ch;
        }
    }
  }
  return out + "\"";
}

// Python-style integer parsing of a JSON Int within [lo, hi] (hi may exceed int64: seeds).
bool json_to_int128(const Json& j, __int128& out) {
  if (j.type != Json::Type::Int) return false;
  const std::string& t = j.text;
  size_t i = 0;
  const bool neg = !t.empty() && t[0] == '-';
  if (neg) i = 1;
  if (i >= t.size() || t.size() - i > 30) return false;  // far beyond 2^64
  __int128 v = 0;
  for (; i < t.size(); ++i) v = v * 10 + (t[i] - '0');
  out = neg ? -v : v;
  return true;
}

// =================================================================================================
// dtypes and tensor strings

struct DtypeInfo {
  const char* name;        // safetensors
  at::ScalarType scalar;   // torch
  size_t size;             // bytes per element
  const char* torch_name;  // str(torch dtype)
  int order;               // safetensors Dtype enum order (its writer sorts by it, descending)
};

const std::vector<DtypeInfo>& dtype_table() {
  static const std::vector<DtypeInfo> table = {
      {"BOOL", at::kBool, 1, "torch.bool", 0},
      {"U8", at::kByte, 1, "torch.uint8", 4},
      {"I8", at::kChar, 1, "torch.int8", 5},
      {"F8_E5M2", at::kFloat8_e5m2, 1, "torch.float8_e5m2", 6},
      {"F8_E4M3", at::kFloat8_e4m3fn, 1, "torch.float8_e4m3fn", 7},
      {"I16", at::kShort, 2, "torch.int16", 9},
      {"U16", at::kUInt16, 2, "torch.uint16", 10},
      {"F16", at::kHalf, 2, "torch.float16", 11},
      {"BF16", at::kBFloat16, 2, "torch.bfloat16", 12},
      {"I32", at::kInt, 4, "torch.int32", 13},
      {"U32", at::kUInt32, 4, "torch.uint32", 14},
      {"F32", at::kFloat, 4, "torch.float32", 15},
      {"F64", at::kDouble, 8, "torch.float64", 16},
      {"I64", at::kLong, 8, "torch.int64", 17},
      {"U64", at::kUInt64, 8, "torch.uint64", 18},
  };
  return table;
}

const DtypeInfo* dtype_by_name(const std::string& name) {
  for (const auto& d : dtype_table())
    if (name == d.name) return &d;
  return nullptr;
}

const DtypeInfo* dtype_by_scalar(at::ScalarType s) {
  for (const auto& d : dtype_table())
    if (s == d.scalar) return &d;
  return nullptr;
}

// Python's repr(tuple(shape)): "()", "(5,)", "(48, 40)".
std::string shape_repr(const std::vector<int64_t>& shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(shape[i]);
  }
  if (shape.size() == 1) out += ",";
  return out + ")";
}

// io.fingerprint: sha256("<dtype>:<shape tuple>:" + bytes), first 16 hex digits.
std::string fingerprint(const DtypeInfo& dt, const std::vector<int64_t>& shape, const char* data,
                        size_t nbytes) {
  Sha256 h;
  h.update(std::string(dt.torch_name) + ":" + shape_repr(shape) + ":");
  h.update(data, nbytes);
  return h.hexdigest().substr(0, 16);
}

// =================================================================================================
// safetensors

struct TensorEntry {
  std::string name;
  const DtypeInfo* dtype = nullptr;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // in the data section
};

struct SafetensorsHeader {
  std::string path;
  std::vector<std::pair<std::string, std::string>> metadata;
  bool has_metadata = false;
  std::vector<TensorEntry> tensors;  // header order
  std::map<std::string, size_t> index;
  uint64_t data_start = 0;

  const std::string* meta(const std::string& key) const {
    for (const auto& kv : metadata)
      if (kv.first == key) return &kv.second;
    return nullptr;
  }
};

[[noreturn]] void unreadable(const std::string& path, const std::string& why) {
  fail(path + ": not a readable safetensors file (" + why + ")");
}

// Reads and validates the header of a safetensors file (as the safetensors library does: known
// dtypes, sizes matching shapes, tensors tiling the data section exactly).
SafetensorsHeader read_header(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) unreadable(path, "cannot open it");
  f.seekg(0, std::ios::end);
  const auto file_size = static_cast<uint64_t>(f.tellg());
  f.seekg(0);
  if (file_size < 8) unreadable(path, "file shorter than the 8-byte header length");
  unsigned char lenbuf[8];
  f.read(reinterpret_cast<char*>(lenbuf), 8);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | lenbuf[i];
  if (n > 100000000ull) unreadable(path, "header too large");
  if (n > file_size - 8) unreadable(path, "header length exceeds the file size");
  std::string text(static_cast<size_t>(n), '\0');
  f.read(text.data(), static_cast<std::streamsize>(n));
  if (!f) unreadable(path, "read error");

  SafetensorsHeader h;
  h.path = path;
  h.data_start = 8 + n;
  const uint64_t data_size = file_size - h.data_start;
  Json j;
  try {
    j = parse_json(text);
  } catch (const Failure& e) {
    unreadable(path, std::string("header: ") + e.what());
  }
  if (j.type != Json::Type::Object) unreadable(path, "header is not a JSON object");
  for (const auto& [name, info] : j.members) {
    if (name == "__metadata__") {
      if (info.type != Json::Type::Object) unreadable(path, "__metadata__ is not an object");
      h.has_metadata = true;
      for (const auto& [k, v] : info.members) {
        if (v.type != Json::Type::String) unreadable(path, "__metadata__ value " + k + " is not a string");
        h.metadata.emplace_back(k, v.text);
      }
      continue;
    }
    if (info.type != Json::Type::Object) unreadable(path, "tensor " + name + ": not an object");
    const Json* dt = info.find("dtype");
    const Json* shape = info.find("shape");
    const Json* offsets = info.find("data_offsets");
    if (!dt || !shape || !offsets || dt->type != Json::Type::String || shape->type != Json::Type::Array ||
        offsets->type != Json::Type::Array || offsets->items.size() != 2)
      unreadable(path, "tensor " + name + ": needs dtype, shape and data_offsets [begin, end]");
    TensorEntry e;
    e.name = name;
    e.dtype = dtype_by_name(dt->text);
    if (!e.dtype) unreadable(path, "tensor " + name + ": unsupported dtype " + dt->text);
    __int128 numel = 1;
    for (const Json& d : shape->items) {
      __int128 v;
      if (!json_to_int128(d, v) || v < 0 || v > (__int128{1} << 62))
        unreadable(path, "tensor " + name + ": invalid shape");
      e.shape.push_back(static_cast<int64_t>(v));
      numel *= v;
      if (numel > (__int128{1} << 62)) unreadable(path, "tensor " + name + ": shape too large");
    }
    __int128 b, en;
    if (!json_to_int128(offsets->items[0], b) || !json_to_int128(offsets->items[1], en) || b < 0 ||
        en < b || en > static_cast<__int128>(data_size))
      unreadable(path, "tensor " + name + ": data_offsets out of the data section");
    e.begin = static_cast<uint64_t>(b);
    e.end = static_cast<uint64_t>(en);
    if (static_cast<__int128>(e.end - e.begin) != numel * static_cast<__int128>(e.dtype->size))
      unreadable(path, "tensor " + name + ": data_offsets do not match dtype and shape");
    h.index[name] = h.tensors.size();
    h.tensors.push_back(std::move(e));
  }
  std::vector<const TensorEntry*> by_offset;
  for (const auto& e : h.tensors) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(),
            [](auto* a, auto* b) { return std::tie(a->begin, a->end) < std::tie(b->begin, b->end); });
  uint64_t at = 0;
  for (const auto* e : by_offset) {
    if (e->begin != at) unreadable(path, "tensor " + e->name + ": data sections overlap or leave gaps");
    at = e->end;
  }
  if (at != data_size) unreadable(path, "the data section does not end where the last tensor ends");
  return h;
}

std::string read_bytes(const SafetensorsHeader& h, const TensorEntry& e) {
  std::ifstream f(h.path, std::ios::binary);
  if (!f) unreadable(h.path, "cannot open it");
  std::string buf(static_cast<size_t>(e.end - e.begin), '\0');
  f.seekg(static_cast<std::streamoff>(h.data_start + e.begin));
  f.read(buf.data(), static_cast<std::streamsize>(buf.size()));
  if (!f) unreadable(h.path, "read error in tensor " + e.name);
  return buf;
}

at::Tensor to_tensor(const TensorEntry& e, const std::string& bytes) {
  at::Tensor t = at::empty(e.shape, at::TensorOptions().dtype(e.dtype->scalar));
  if (!bytes.empty()) std::memcpy(t.data_ptr(), bytes.data(), bytes.size());
  return t;
}

// Writes tensors as safetensors' own writer does: metadata first, tensors sorted by dtype (largest
// enum first) then name, header padded with spaces to a multiple of 8.
void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                       const std::vector<std::pair<std::string, std::string>>& metadata) {
  struct Item {
    std::string name;
    const DtypeInfo* dt;
    at::Tensor t;
  };
  std::vector<Item> items;
  for (const auto& [name, t] : tensors) {
    const DtypeInfo* dt = dtype_by_scalar(t.scalar_type());
    if (!dt) fail(path + ": cannot write tensor " + name + " of dtype " + std::string(c10::toString(t.scalar_type())));
    items.push_back({name, dt, t.contiguous().cpu()});
  }
  std::sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    if (a.dt->order != b.dt->order) return a.dt->order > b.dt->order;
    return a.name < b.name;
  });
  std::string header = "{";
  if (!metadata.empty()) {
    header += "\"__metadata__\":{";
    for (size_t i = 0; i < metadata.size(); ++i) {
      if (i) header += ",";
      header += compact_json_string(metadata[i].first) + ":" + compact_json_string(metadata[i].second);
    }
    header += "}";
  }
  uint64_t offset = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    const Item& it = items[i];
    const uint64_t nbytes = it.t.numel() * it.dt->size;
    if (i || !metadata.empty()) header += ",";
    header += compact_json_string(it.name) + ":{\"dtype\":\"" + it.dt->name + "\",\"shape\":[";
    // appended piece by piece: GCC 12 warns (-Wrestrict, a false positive: PR 105329) on "literal" + std::string&&
    for (int64_t d = 0; d < it.t.dim(); ++d) header.append(d ? "," : "").append(std::to_string(it.t.size(d)));
    header.append("],\"data_offsets\":[").append(std::to_string(offset)).append(",");
    header.append(std::to_string(offset + nbytes)).append("]}");
    offset += nbytes;
  }
  header += "}";
  header.append((8 - header.size() % 8) % 8, ' ');
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) fail(path + ": cannot write");
  unsigned char lenbuf[8];
  for (int i = 0; i < 8; ++i) lenbuf[i] = static_cast<unsigned char>(static_cast<uint64_t>(header.size()) >> (8 * i));
  f.write(reinterpret_cast<const char*>(lenbuf), 8);
  f.write(header.data(), static_cast<std::streamsize>(header.size()));
  for (const Item& it : items) {
    const size_t nbytes = static_cast<size_t>(it.t.numel()) * it.dt->size;
    if (nbytes) f.write(static_cast<const char*>(it.t.data_ptr()), static_cast<std::streamsize>(nbytes));
  }
  f.close();
  if (!f) fail(path + ": write error");
}

// =================================================================================================
// base weights (io.BaseWeights)

class BaseWeights {
 public:
  explicit BaseWeights(const std::string& path) : path_(path) {
    std::error_code ec;
    if (fs::is_directory(path, ec)) {
      std::vector<std::string> names;
      bool has_bin = false;
      for (const auto& entry : fs::directory_iterator(path, ec)) {
        const std::string name = entry.path().filename().string();
        if (ends_with(name, ".safetensors")) names.push_back(name);
        if (ends_with(name, ".bin")) has_bin = true;
      }
      if (ec) fail(path + ": cannot list the folder (" + ec.message() + ")");
      if (names.empty()) {
        if (has_bin) fail(path + ": only pickle (.bin) weights; subspace_ext reads safetensors only");
        fail(path + ": no .safetensors weights in this folder");
      }
      std::sort(names.begin(), names.end());
      for (const auto& n : model_files(path, names)) files_.push_back((fs::path(path) / n).string());
      may_tie_ = config_may_tie_embeddings((fs::path(path) / "config.json").string());
    } else if (fs::is_regular_file(path, ec)) {
      files_.push_back(path);
      is_file_ = true;
    } else {
      fail(path + ": no such file or folder (expected a transformers model folder or a .safetensors file)");
    }
    for (size_t i = 0; i < files_.size(); ++i) {
      headers_.push_back(read_header(files_[i]));
      for (const auto& e : headers_.back().tensors) {
        const auto [at, fresh] = where_.emplace(e.name, i);
        if (!fresh)  // io.BaseWeights: a stray copy beside the model is not read in its place
          fail(path + ": " + e.name + " is in two files, " + fs::path(files_[at->second]).filename().string() +
               " and " + fs::path(files_[i]).filename().string() + ": keep one copy of the model in the folder");
      }
    }
  }

  // The weight key of a module path, matched on the longest common dotted suffix.
  std::string key_for_module(const std::string& module) const {
    std::vector<std::string> parts;
    size_t start = 0;
    while (true) {
      const size_t dot = module.find('.', start);
      parts.push_back(module.substr(start, dot == std::string::npos ? std::string::npos : dot - start));
      if (dot == std::string::npos) break;
      start = dot + 1;
    }
    for (size_t s = 0; s < parts.size(); ++s) {
      std::string key;
      for (size_t k = s; k < parts.size(); ++k) key += (k > s ? "." : "") + parts[k];
      key += ".weight";
      if (where_.count(key)) return key;
    }
    // Else the one key that ends with the module's path (a bare encoder's adapter on a task model's
    // checkpoint: bert.encoder...); several: ambiguous. io.BaseWeights.key_for_module's rules.
    const std::string tail = "." + module + ".weight";
    std::vector<std::string> longer;
    for (const auto& kv : where_)
      if (ends_with(kv.first, tail)) longer.push_back(kv.first);
    if (longer.size() > 1)
      fail(path_ + ": adapted module " + module + " matches several weights (" + longer[0] + ", " + longer[1] +
           (longer.size() > 2 ? " ..." : "") + "): is this the adapter's base model?");
    if (longer.size() == 1) return longer[0];
    fail(path_ + ": no weight for adapted module " + module + " (is this the adapter's base model?)");
  }

  bool has(const std::string& key) const { return where_.count(key) > 0; }

  // Whether the model may tie its output embedding to the input one: a folder whose config.json does not
  // set tie_word_embeddings to false (the Python decoder reads the tie from the model the config builds;
  // a bare .safetensors file has no config, and neither decoder takes a tied weight from it).
  bool may_tie_embeddings() const { return may_tie_; }
  bool is_file() const { return is_file_; }

  // (entry, raw bytes) of a key found by key_for_module.
  std::pair<TensorEntry, std::string> get(const std::string& key) const {
    const SafetensorsHeader& h = headers_[where_.at(key)];
    const TensorEntry& e = h.tensors[h.index.at(key)];
    return {e, read_bytes(h, e)};
  }

  // io.BaseWeights.get_expert, with solar._package_base_weight's checks: a MoE expert's 2-D slice (entry with
  // its shape, bytes): the rows of its base_parts concatenated, else base_key[expert] (read alone).
  std::pair<TensorEntry, std::string> get_expert(const std::string& base_key, const std::vector<std::string>& parts,
                                                 int64_t expert, int64_t experts, const std::string& what) const {
    const std::vector<std::string> keys = parts.empty() ? std::vector<std::string>{base_key} : parts;
    for (const auto& k : keys)
      if (!has(k)) fail(what + ": the base has no weight " + k + ": wrong base model?");
    if (parts.empty()) {
      const SafetensorsHeader& h = headers_[where_.at(base_key)];
      TensorEntry e = h.tensors[h.index.at(base_key)];
      if (e.shape.size() != 3 || e.shape[0] != experts)
        fail(what + ": base weight " + base_key + " has shape " + shape_repr(e.shape) + ", not " +
             std::to_string(experts) + " experts: wrong base model?");
      const uint64_t size = static_cast<uint64_t>(e.shape[1]) * static_cast<uint64_t>(e.shape[2]) * e.dtype->size;
      e.begin += size * static_cast<uint64_t>(expert);
      e.end = e.begin + size;
      e.shape.erase(e.shape.begin());
      return {e, read_bytes(h, e)};
    }
    auto [out, bytes] = get(keys[0]);
    for (size_t i = 1; i < keys.size(); ++i) {
      auto [e, b] = get(keys[i]);
      if (e.dtype != out.dtype)
        fail(what + ": " + path_ + ": " + keys[0] + " and " + keys[i] + " (merged into one expert's slice of " +
             base_key + ") are stored in different dtypes");
      if (e.shape.size() != 2 || out.shape.size() != 2 || e.shape[1] != out.shape[1])
        fail(what + ": base weights " + keys[0] + " " + shape_repr(out.shape) + " and " + keys[i] + " " +
             shape_repr(e.shape) + " do not stack as rows: wrong base model?");
      out.shape[0] += e.shape[0];
      bytes += b;
    }
    return {out, bytes};
  }

 private:
  static bool ends_with(const std::string& s, const std::string& suffix) {
    return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
  }

  // io._model_files: of a folder's .safetensors files (sorted), those transformers loads: model.safetensors, else
  // the shards model.safetensors.index.json maps the weights to, else all of them.
  static std::vector<std::string> model_files(const std::string& folder, const std::vector<std::string>& names) {
    if (std::find(names.begin(), names.end(), "model.safetensors") != names.end()) return {"model.safetensors"};
    const std::string index = (fs::path(folder) / "model.safetensors.index.json").string();
    std::error_code ec;
    if (!fs::is_regular_file(index, ec)) return names;
    std::ifstream f(index, std::ios::binary);
    std::stringstream text;
    text << f.rdbuf();
    std::set<std::string> shards;
    try {
      if (!f) throw Failure("cannot read it");
      const Json json = parse_json(text.str());
      const Json* map = json.type == Json::Type::Object ? json.find("weight_map") : nullptr;
      if (!map || map->type != Json::Type::Object) throw Failure("no weight_map object");
      for (const auto& [name, shard] : map->members) {
        if (shard.type != Json::Type::String) throw Failure("weight_map must map names to file names");
        shards.insert(shard.text);
      }
    } catch (const Failure& e) {
      fail(index + ": not a readable shard index (" + e.what() + ")");
    }
    if (shards.empty()) fail(index + ": not a readable shard index (weight_map must map names to file names)");
    for (const auto& s : shards)
      if (std::find(names.begin(), names.end(), s) == names.end())
        fail(index + ": maps weights to " + s + ", which is not in the folder");
    return {shards.begin(), shards.end()};
  }

  static bool config_may_tie_embeddings(const std::string& config_path) {
    std::ifstream f(config_path, std::ios::binary);
    if (!f) return false;
    std::stringstream text;
    text << f.rdbuf();
    try {
      const Json config = parse_json(text.str());
      const Json* tie = config.type == Json::Type::Object ? config.find("tie_word_embeddings") : nullptr;
      return config.type == Json::Type::Object && !(tie && tie->type == Json::Type::Bool && !tie->boolean);
    } catch (const Failure&) {
      return false;
    }
  }

  std::string path_;
  std::vector<std::string> files_;
  std::vector<SafetensorsHeader> headers_;
  std::map<std::string, size_t> where_;
  bool may_tie_ = false;
  bool is_file_ = false;
};

// =================================================================================================
// the package (solar.SolarPackage.load)

// solar._module_path: non-empty dotted parts, no control character (the name goes into tensor names and
// one-line messages).
bool module_path(const std::string& m) {
  if (m.empty() || m.front() == '.' || m.back() == '.' || m.find("..") != std::string::npos) return false;
  return std::none_of(m.begin(), m.end(), [](char c) { return static_cast<unsigned char>(c) < 0x20; });
}

// Whether no number in a JSON value is NaN or infinite.
bool all_finite(const Json& j) {
  if (j.type == Json::Type::Float) return std::isfinite(j.number);
  for (const Json& item : j.items)
    if (!all_finite(item)) return false;
  for (const auto& member : j.members)
    if (!all_finite(member.second)) return false;
  return true;
}

constexpr const char* kFormat = "subspace_ext.solar";
constexpr const char* kFormatVersion = "1";         // every layer SOLAR-encoded
constexpr const char* kFormatVersionLowrank = "2";  // with low-rank (truncated-SVD) layers
constexpr const char* kFormatVersionInt8 = "3";     // with int8 codes (and their float32 scales)
constexpr const char* kFormatVersionPacked = "4";   // layout "packed": all layers' numbers in 3 tensors
constexpr double kChecksumTol = 1e-6;

struct Layer {
  std::string module, base_key, fingerprint;
  std::vector<int64_t> shape;
  Json rank_json, scaling_json;  // kept as written (the AdaLoRA config conversion uses them)
  int64_t rank = 0, stream = 0;
  double scaling = 0.0, nnz = 0.0;
  std::vector<double> checksum;
  bool fan_in_fan_out = false;  // base weight stored n x m (transformers' Conv1D): basis of its transpose
  bool renamed = false;         // module is the loaded model's name for base_key (transformers renames the
                                // stored weights as it loads them): base_key is taken
  bool lowrank = false;         // kind "lowrank": the factors lora_B (m x t), lora_A (t x n) are stored
  int64_t expert = -1;          // >= 0: this expert's pair of a LoRA on a MoE block's 3-D expert parameter; its
  int64_t experts = 0;          // base weight is base_key[expert], or the rows of base_parts concatenated
  std::vector<std::string> base_parts;  // (solar.LayerInfo); experts: how many the parameter holds
};

// A layer as messages name it: "layer <module>", and " (expert <e>)" for a MoE expert's.
std::string layer_name(const Layer& info) {
  return "layer " + info.module + (info.expert >= 0 ? " (expert " + std::to_string(info.expert) + ")" : "");
}

// solar._parse_expert: a layer's MoE expert fields.
void parse_expert(const Json& l, const std::string& where, Layer& L) {
  auto integer = [&](const char* key, int64_t fallback) {
    const Json* f = l.find(key);
    if (!f) return fallback;
    __int128 v;
    if (f->type != Json::Type::Int || !json_to_int128(*f, v) || v < -1 || v > (__int128{1} << 62))
      fail(where + key + " must be int, got " +
           (f->type == Json::Type::Int ? "a number out of range" : "another type"));
    return static_cast<int64_t>(v);
  };
  L.expert = integer("expert", -1);
  L.experts = integer("experts", 0);
  if (!((L.expert == -1 && L.experts == 0) || (0 <= L.expert && L.expert < L.experts)))
    fail(where + "expert " + std::to_string(L.expert) + " of " + std::to_string(L.experts) +
         " experts: an expert layer needs 0 <= expert < experts, any other layer neither field");
  if (const Json* f = l.find("base_parts")) {
    if (f->type != Json::Type::Array) fail(where + "base_parts must be list");
    for (const Json& p : f->items) {
      if (p.type != Json::Type::String || p.text.empty() || L.expert < 0)
        fail(where + "base_parts must be base weight names, and only on an expert layer");
      L.base_parts.push_back(p.text);
    }
  }
}

// solar._check_experts: each module's layers are one plain layer, or its experts 0 .. E-1 once each of one
// shape, rank, scaling and layout.
void check_experts(const std::vector<Layer>& layers) {
  std::map<std::string, std::vector<const Layer*>> groups;
  std::vector<std::string> order;
  for (const Layer& l : layers) {
    if (!groups.count(l.module)) order.push_back(l.module);
    groups[l.module].push_back(&l);
  }
  for (const std::string& module : order) {
    const auto& ls = groups[module];
    if (ls.size() == 1 && ls[0]->expert < 0) continue;
    const Layer& first = *ls[0];
    std::vector<int64_t> seen;
    bool same = true;
    for (const Layer* l : ls) {
      seen.push_back(l->expert);
      same = same && l->experts == first.experts && l->shape == first.shape && l->rank == first.rank &&
             l->scaling == first.scaling && l->fan_in_fan_out == first.fan_in_fan_out;
    }
    std::sort(seen.begin(), seen.end());
    bool all = static_cast<int64_t>(seen.size()) == first.experts;
    for (size_t e = 0; all && e < seen.size(); ++e) all = seen[e] == static_cast<int64_t>(e);
    if (!same || !all)
      fail("module " + module + ": " + std::to_string(ls.size()) +
           " layers, not one, nor experts 0 .. E-1 once each of one shape, rank, scaling and layout");
  }
}

struct Package {
  std::string basis = "1";  // solar.BASIS_RULE of the sender (the field's literal; absent: 1)
  int64_t seed = 0;
  double eps = 0.0;
  std::string dtype = "float32";
  Json peft_config;
  std::vector<Layer> layers;
  std::vector<at::Tensor> values, indices;  // SOLAR layers (undefined for low-rank ones)
  std::vector<at::Tensor> lora_B, lora_A;   // low-rank layers (undefined for SOLAR ones)
  std::vector<std::pair<std::string, at::Tensor>> extra;  // name without "extra."
};

// ops._seed: a Python int in [-2^63, 2^64), passed as the same 64 bits.
int64_t as_seed(const Json& j, const std::string& what) {
  __int128 v;
  if (j.type != Json::Type::Int) fail(what + " must be an integer");
  if (!json_to_int128(j, v) || v < -(__int128{1} << 63) || v >= (__int128{1} << 64)) fail(what + " must fit in 64 bits");
  if (v >= (__int128{1} << 63)) v -= (__int128{1} << 64);
  return static_cast<int64_t>(v);
}

double as_double(const Json& j, const std::string& what) {
  if (!j.is_number()) fail(what + " must be a number");
  return j.number;
}

// solar._config_rank: the largest LoRA rank a peft config names (r, init_r, rank_pattern values), at
// most kMaxRankAboveShape (solar.MAX_RANK_ABOVE_SHAPE: a tiny package must not make us allocate
// gigabytes of zero padding); 0 if none.
constexpr int64_t kMaxRankAboveShape = 4096;
int64_t largest_config_rank(const Json* config) {
  int64_t best = 0;
  if (!config || config->type != Json::Type::Object) return best;
  auto consider = [&](const Json* v) {
    __int128 x;
    if (v && v->type == Json::Type::Int && json_to_int128(*v, x) && x > best)
      best = static_cast<int64_t>(std::min<__int128>(x, kMaxRankAboveShape));
  };
  consider(config->find("r"));
  consider(config->find("init_r"));
  if (const Json* pattern = config->find("rank_pattern"); pattern && pattern->type == Json::Type::Object)
    for (const auto& kv : pattern->members) consider(&kv.second);
  return best;
}

// A layer's "shape": a list of two integers >= 1 (solar._is_shape).
std::vector<int64_t> layer_shape(const Json& shape, const std::string& where) {
  if (shape.type != Json::Type::Array) fail(where + "shape must be a list");
  std::vector<int64_t> out;
  for (const Json& d : shape.items) {
    __int128 v;
    if (!json_to_int128(d, v) || v < 0 || v > (__int128{1} << 62)) fail(where + "invalid shape");
    out.push_back(static_cast<int64_t>(v));
  }
  if (out.size() != 2 || out[0] < 1 || out[1] < 1) fail(where + "invalid shape");
  return out;
}

// A layer's "kind" ("solar" when absent): whether it is "lowrank".
bool is_lowrank(const Json& layer, const std::string& where) {
  const Json* k = layer.find("kind");
  if (!k) return false;
  if (k->type != Json::Type::String || (k->text != "solar" && k->text != "lowrank"))
    fail(where + "kind must be 'solar' or 'lowrank'");
  return k->text == "lowrank";
}

// solar._unpack: a packed package's tensors under the per-layer names, each layer's share cut by its
// kind, nnz and shape (the per-layer checks then run as for the per-layer layout).
std::map<std::string, at::Tensor> unpack(const std::map<std::string, at::Tensor>& tensors, const Json& layers) {
  static const char* kPacked[] = {"packed.values", "packed.indices", "packed.scales"};
  for (const auto& kv : tensors)
    if (kv.first.rfind("extra.", 0) != 0 && kv.first != kPacked[0] && kv.first != kPacked[1] && kv.first != kPacked[2])
      fail("unexpected tensor '" + kv.first + "' in a packed package");
  for (int k = 0; k < 2; ++k)
    if (!tensors.count(kPacked[k])) fail(std::string("KeyError: '") + kPacked[k] + "'");
  const at::Tensor& values = tensors.at(kPacked[0]);
  const at::Tensor& indices = tensors.at(kPacked[1]);
  const bool has_scales = tensors.count(kPacked[2]) > 0;
  if (values.dim() != 1 || !(values.is_floating_point() || values.scalar_type() == at::kChar))
    fail("packed.values must be a 1-D floating-point or int8 tensor");
  if (indices.dim() != 1 || indices.scalar_type() != at::kInt) fail("packed.indices must be a 1-D int32 tensor");
  if (has_scales != (values.scalar_type() == at::kChar))
    fail("packed.scales must be present exactly when packed.values is int8");
  if (has_scales && (tensors.at(kPacked[2]).dim() != 1 || tensors.at(kPacked[2]).scalar_type() != at::kFloat))
    fail("packed.scales must be a 1-D float32 tensor");
  std::map<std::string, at::Tensor> out;
  for (const auto& kv : tensors)
    if (kv.first.rfind("extra.", 0) == 0) out[kv.first] = kv.second;
  std::map<std::string, int64_t> at_;
  auto take = [&](const char* name, std::vector<int64_t> shape, const std::string& where) {
    const at::Tensor& t = tensors.at(name);
    __int128 count = 1;  // nnz, m, n <= 2^62: no overflow
    for (int64_t d : shape) count *= d;
    int64_t& pos = at_[name];
    if (pos + count > t.numel())
      fail(where + name + " ends before this layer's " +
           (count < (__int128{1} << 62) ? std::to_string(static_cast<int64_t>(count)) : std::string("> 2^62")) +
           " numbers (it holds " + std::to_string(t.numel()) + "): nnz or shape edited, or a damaged package");
    pos += static_cast<int64_t>(count);
    return t.narrow(0, pos - static_cast<int64_t>(count), static_cast<int64_t>(count)).reshape(shape);
  };
  for (size_t i = 0; i < layers.items.size(); ++i) {
    const Json& l = layers.items[i];
    const std::string where = "layer " + std::to_string(i) + ": ", prefix = "layer." + std::to_string(i) + ".";
    if (l.type != Json::Type::Object) fail(where + "not an object");
    const bool lowrank = is_lowrank(l, where);
    const Json* nnz_json = l.find("nnz");
    __int128 nnz128;
    if (!nnz_json || nnz_json->type != Json::Type::Int || !json_to_int128(*nnz_json, nnz128) || nnz128 < 0 ||
        nnz128 > (__int128{1} << 62))
      fail(where + "nnz must be an integer >= 0 in a packed package");
    const int64_t nnz = static_cast<int64_t>(nnz128);
    const Json* shape = l.find("shape");
    if (!shape) fail(where + "invalid shape");
    const std::vector<int64_t> mn = layer_shape(*shape, where);
    auto part = [&](const char* kind, std::vector<int64_t> value_shape, std::vector<int64_t> scale_shape) {
      out[prefix + kind] = take(kPacked[0], value_shape, where);
      if (has_scales) out[prefix + kind + "_scale"] = take(kPacked[2], scale_shape, where);
    };
    if (lowrank) {
      part("lora_B", {mn[0], nnz}, {1, nnz});
      part("lora_A", {nnz, mn[1]}, {nnz, 1});
    } else {
      part("values", {nnz}, {1});
      out[prefix + "indices"] = take(kPacked[1], {nnz}, where);
    }
  }
  for (const char* name : kPacked)
    if (tensors.count(name) && at_[name] != tensors.at(name).numel())
      fail(std::string(name) + " holds " + std::to_string(tensors.at(name).numel()) + " numbers, the layers use " +
           std::to_string(at_[name]) + ": nnz or shape edited, or a damaged package");
  return out;
}

Package load_package(const std::string& path) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) fail(path + ": no such file");
  const SafetensorsHeader h = read_header(path);
  const std::string* format = h.meta("format");
  if (!format || *format != kFormat)
    fail(path + ": not a SOLAR package (format " + (format ? "'" + *format + "'" : std::string("None")) + ")");
  const std::string* version = h.meta("format_version");
  if (!version || (*version != kFormatVersion && *version != kFormatVersionLowrank && *version != kFormatVersionInt8 &&
                   *version != kFormatVersionPacked))
    fail(path + ": package format version " + (version ? *version : std::string("None")) +
         " is not supported (this build reads versions " + kFormatVersion + ", " + kFormatVersionLowrank + ", " +
         kFormatVersionInt8 + ", " + kFormatVersionPacked + ")");

  // All tensors, and the digest over them (io.tensors_digest), then the package digest.
  std::map<std::string, at::Tensor> tensors;  // sorted by name = Python sorted()
  Sha256 digest;
  {
    std::map<std::string, const TensorEntry*> sorted;
    for (const auto& e : h.tensors) sorted[e.name] = &e;
    for (const auto& [name, e] : sorted) {
      const std::string bytes = read_bytes(h, *e);
      digest.update(name);
      digest.update("\0", 1);
      digest.update(fingerprint(*e->dtype, e->shape, bytes.data(), bytes.size()));
      tensors[name] = to_tensor(*e, bytes);
    }
  }
  // The package digest covers the tensors and the solar metadata (io.content_digest).
  Sha256 package_digest;
  package_digest.update(digest.hexdigest());
  package_digest.update("\n", 1);
  if (const std::string* solar_meta = h.meta("solar")) package_digest.update(*solar_meta);
  const std::string* stored = h.meta("digest");
  if (!stored || package_digest.hexdigest() != *stored)
    fail(path + ": contents do not match the package digest (damaged)");

  Package pkg;
  bool newer_build = false;  // the failure is an unknown basis rule, not malformed metadata
  try {
    const std::string* solar = h.meta("solar");
    if (!solar) fail("KeyError: 'solar'");
    const Json info = parse_json(*solar);
    if (info.type != Json::Type::Object) fail("the solar metadata is not an object");
    // solar._basis_rule, before any other field: a newer build's package may have other new fields
    if (const Json* b = info.find("basis")) {
      if (b->type != Json::Type::Int) fail("basis must be an integer");
      pkg.basis = b->text;
    }
    if (pkg.basis != "1" && pkg.basis != "2") {  // solar.BASIS_RULES
      newer_build = true;
      fail("basis rule " + pkg.basis +
           " is unknown to this build (it knows 1, 2): a package from a newer subspace_ext (update this one to " +
           "decode it), or an edited one");
    }
    auto need = [](const Json& obj, const char* key) -> const Json& {
      const Json* v = obj.find(key);
      if (!v) fail(std::string("missing '") + key + "'");
      return *v;
    };
    const Json& layers = need(info, "layers");
    if (layers.type != Json::Type::Array) fail("'layers' is not a list");
    if (*version == kFormatVersionPacked) tensors = unpack(tensors, layers);
    const int64_t config_rank = largest_config_rank(info.find("peft_config"));
    static const char* kRequired[] = {"module", "base_key", "shape", "rank", "scaling", "stream",
                                      "fingerprint", "checksum"};
    static const char* kOptional[] = {"nnz",  "energy",  "rel_error", "lora_numbers", "fan_in_fan_out",
                                      "kind", "renamed", "expert",    "experts",      "base_parts"};
    for (size_t i = 0; i < layers.items.size(); ++i) {
      const Json& l = layers.items[i];
      const std::string where = "layer " + std::to_string(i) + ": ";
      if (l.type != Json::Type::Object) fail(where + "not an object");
      for (const auto& kv : l.members) {
        const bool known = std::any_of(std::begin(kRequired), std::end(kRequired), [&](const char* k) { return kv.first == k; }) ||
                           std::any_of(std::begin(kOptional), std::end(kOptional), [&](const char* k) { return kv.first == k; });
        if (!known) fail(where + "unexpected field '" + kv.first + "'");
      }
      Layer L;
      const Json& module = need(l, "module");
      const Json& base_key = need(l, "base_key");
      const Json& fp = need(l, "fingerprint");
      if (module.type != Json::Type::String || base_key.type != Json::Type::String || fp.type != Json::Type::String)
        fail(where + "module, base_key and fingerprint must be strings");
      L.module = module.text;
      if (!module_path(L.module)) fail(where + "module must be a dotted module path (no empty part, no control character)");
      L.base_key = base_key.text;
      L.fingerprint = fp.text;
      L.shape = layer_shape(need(l, "shape"), where);
      L.rank_json = need(l, "rank");
      __int128 r;
      const int64_t top = std::max(std::min(L.shape[0], L.shape[1]), config_rank);  // peft allows r > min(m, n)
      if (!json_to_int128(L.rank_json, r) || r < 1 || r > top)
        fail(where + "rank must be an integer in [1, " + std::to_string(top) + "]");
      L.rank = static_cast<int64_t>(r);
      L.scaling_json = need(l, "scaling");
      L.scaling = as_double(L.scaling_json, where + "scaling");
      if (!(L.scaling > 0.0 && std::isfinite(L.scaling))) fail(where + "scaling must be a finite number > 0");
      L.stream = as_seed(need(l, "stream"), where + "stream");
      const Json& ck = need(l, "checksum");
      if (ck.type != Json::Type::Array) fail(where + "checksum must be a list");
      for (const Json& c : ck.items) L.checksum.push_back(as_double(c, where + "checksum"));
      const Json* nnz = l.find("nnz");
      L.nnz = nnz ? as_double(*nnz, where + "nnz") : 0.0;
      if (const Json* f = l.find("fan_in_fan_out")) {
        if (f->type != Json::Type::Bool) fail(where + "fan_in_fan_out must be true or false");
        L.fan_in_fan_out = f->boolean;
      }
      if (const Json* f = l.find("renamed")) {
        if (f->type != Json::Type::Bool) fail(where + "renamed must be true or false");
        L.renamed = f->boolean;
      }
      parse_expert(l, where, L);
      L.lowrank = is_lowrank(l, where);
      if (!L.lowrank && (L.checksum.size() != 2 || !std::isfinite(L.checksum[0]) || !std::isfinite(L.checksum[1])))
        fail(where + "checksum must be 2 finite numbers");
      pkg.layers.push_back(std::move(L));
      const Layer& added = pkg.layers.back();
      auto tensor = [&](const char* kind) -> at::Tensor {
        const std::string key = "layer." + std::to_string(i) + "." + kind;
        auto it = tensors.find(key);
        if (it == tensors.end()) fail("KeyError: '" + key + "'");
        return it->second;
      };
      // solar._parse_scale + solar._dequantize: an int8 tensor stands for codes * scales (float32)
      auto dequantized = [&](const char* kind, const at::Tensor& codes, at::IntArrayRef scale_shape) {
        if (codes.scalar_type() != at::kChar) return codes;
        const std::string name = "layer." + std::to_string(i) + "." + kind;
        auto it = tensors.find(name + "_scale");
        if (it == tensors.end()) fail(where + "int8 tensor " + name + " has no scales (" + name + "_scale)");
        const at::Tensor& s = it->second;
        if (s.scalar_type() != at::kFloat || s.sizes() != scale_shape)
          fail(where + name + "_scale must be float32 of shape " + shape_repr(scale_shape.vec()));
        if (!at::isfinite(s).all().item<bool>() || !(s >= 0).all().item<bool>())
          fail(where + name + "_scale must be finite and >= 0");
        return codes.to(at::kFloat) * s;
      };
      auto float_or_int8 = [](const at::Tensor& t) { return t.is_floating_point() || t.scalar_type() == at::kChar; };
      double stored_items;
      if (added.lowrank) {  // solar._parse_factors
        at::Tensor B = tensor("lora_B"), A = tensor("lora_A");
        if (!float_or_int8(B) || !float_or_int8(A) || B.dim() != 2 || A.dim() != 2)
          fail(where + "lora_B and lora_A must be 2-D floating-point or int8 tensors");
        const int64_t t = B.size(1);
        if (B.size(0) != added.shape[0] || A.size(0) != t || A.size(1) != added.shape[1] || t > added.rank)
          fail(where + "low-rank factors do not fit a " + std::to_string(added.shape[0]) + " x " +
               std::to_string(added.shape[1]) + " layer of rank " + std::to_string(added.rank));
        if (!at::isfinite(B).all().item<bool>() || !at::isfinite(A).all().item<bool>())
          fail(where + "low-rank factors contain NaN or Inf");
        pkg.values.emplace_back();
        pkg.indices.emplace_back();
        pkg.lora_B.push_back(dequantized("lora_B", B, {1, t}));
        pkg.lora_A.push_back(dequantized("lora_A", A, {t, 1}));
        stored_items = static_cast<double>(t);
      } else {
        at::Tensor v = tensor("values");
        if (!float_or_int8(v) || v.dim() != 1) fail(where + "values must be a 1-D floating-point or int8 tensor");
        pkg.values.push_back(dequantized("values", v, {1}));
        pkg.indices.push_back(tensor("indices"));
        pkg.lora_B.emplace_back();
        pkg.lora_A.emplace_back();
        stored_items = static_cast<double>(pkg.values.back().numel());
      }
      if (nnz && added.nnz != stored_items)
        fail(where + (added.lowrank ? "nnz does not match the stored factor pairs"
                                    : "nnz does not match the stored coefficients"));
    }
    check_experts(pkg.layers);
    pkg.seed = as_seed(need(info, "seed"), "seed");
    pkg.eps = as_double(need(info, "eps"), "eps");
    pkg.peft_config = need(info, "peft_config");
    if (pkg.peft_config.type != Json::Type::Object) fail("peft_config is not an object");
    for (const char* key : {"r", "lora_alpha", "init_r"})  // numbers where present, as solar._parse
      if (const Json* v = pkg.peft_config.find(key); v && !v->is_number())
        fail(std::string("peft_config ") + key + " must be a number");
    if (!all_finite(pkg.peft_config))  // it becomes adapter_config.json, where NaN / Infinity are not JSON
      fail("peft_config holds NaN or Inf (not valid JSON in an adapter config)");
    if (const Json* sk = info.find("skipped"); sk && sk->type != Json::Type::Array) fail("skipped must be a list");
    if (const Json* dt = info.find("dtype")) {
      if (dt->type != Json::Type::String) fail("dtype must be a string");
      pkg.dtype = dt->text;
    }
  } catch (const Failure& e) {
    if (newer_build) fail(path + ": " + e.what());
    fail(path + ": malformed package metadata (" + e.what() + ")");
  }
  std::set<std::string> decoded;  // it would replace the decoded factor in the adapter
  for (const Layer& l : pkg.layers)
    for (const char* side : {"A", "B"}) decoded.insert("base_model.model." + l.module + ".lora_" + side + ".weight");
  for (const auto& [name, t] : tensors)
    if (name.rfind("extra.", 0) == 0) {
      if (t.is_floating_point() && !t.isfinite().all().item<bool>())
        fail(path + ": malformed package metadata (extra: tensor " + name.substr(6) + " holds NaN or Inf)");
      if (decoded.count(name.substr(6)))
        fail(path + ": malformed package metadata (extra: tensor " + name.substr(6) +
             " is a LoRA factor the package decodes)");
      pkg.extra.emplace_back(name.substr(6), t);
    }
  return pkg;
}

at::ScalarType output_dtype(const std::string& name) {
  static const std::map<std::string, at::ScalarType> names = {
      {"float32", at::kFloat}, {"float", at::kFloat},      {"float64", at::kDouble},
      {"double", at::kDouble}, {"float16", at::kHalf},     {"half", at::kHalf},
      {"bfloat16", at::kBFloat16}};
  auto it = names.find(name);
  if (it == names.end()) fail("package dtype '" + name + "' is not a floating-point torch dtype");
  return it->second;
}

// solar._adalora_as_lora: an AdaLoRA package decodes to a plain LoRA adapter with the same update.
Json adalora_as_lora(const Json& config, const std::vector<Layer>& layers) {
  static const char* kDrop[] = {"init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2",
                                "orth_reg_weight", "total_step"};
  Json out = Json::object();
  for (const auto& kv : config.members) {
    if (std::none_of(std::begin(kDrop), std::end(kDrop), [&](const char* k) { return kv.first == k; }))
      out.members.push_back(kv);
  }
  out.set("peft_type", Json::string("LORA"));
  if (layers.empty()) fail("an AdaLoRA package without layers cannot be converted to LoRA");
  const Layer* top = &layers[0];
  for (const Layer& l : layers)
    if (l.rank > top->rank) top = &l;
  out.set("r", top->rank_json);
  out.set("lora_alpha", top->rank_json);
  Json rank_pattern = Json::object(), alpha_pattern = Json::object();
  for (const Layer& l : layers) {
    rank_pattern.set(l.module, l.rank_json);
    // l.scaling * l.rank in Python: an int when the stored scaling is an int, else a float.
    __int128 s;
    if (json_to_int128(l.scaling_json, s) && s > -(__int128{1} << 62) && s < (__int128{1} << 62) &&
        l.rank < (int64_t{1} << 40)) {
      const __int128 p = s * l.rank;
      if (p > -(__int128{1} << 100) && p < (__int128{1} << 100)) {
        Json j;
        j.type = Json::Type::Int;
        std::string digits;
        __int128 a = p < 0 ? -p : p;
        do {
          digits.insert(digits.begin(), static_cast<char>('0' + static_cast<int>(a % 10)));
          a /= 10;
        } while (a > 0);
        j.text = (p < 0 ? "-" : "") + digits;
        j.number = static_cast<double>(p);
        alpha_pattern.set(l.module, j);
        continue;
      }
    }
    alpha_pattern.set(l.module, Json::floating(l.scaling * static_cast<double>(l.rank)));
  }
  out.set("rank_pattern", rank_pattern);
  out.set("alpha_pattern", alpha_pattern);
  out.set("use_rslora", Json::boolean_value(false));
  Json targets;  // the decoded layers exactly (AdaLoRA layers pruned to rank 0 are not among them)
  targets.type = Json::Type::Array;
  for (const Layer& l : layers) targets.items.push_back(Json::string(l.module));
  out.set("target_modules", targets);
  return out;
}

// =================================================================================================
// decoding (solar.decompress)

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

std::string python_float_list(const std::vector<double>& v) {
  std::string out = "[";
  for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + python_float_repr(v[i]);
  return out + "]";
}

void decode(const std::string& package_path, const std::string& base_path, const std::string& out_dir) {
  const Package pkg = load_package(package_path);
  const BaseWeights bw(base_path);
  const at::ScalarType dtype = output_dtype(pkg.dtype);

  auto solar_basis = op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, int64_t, double)>(
      "subspace_ext::solar_basis");
  auto solar_decode = op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double, int64_t,
      int64_t)>("subspace_ext::solar_decode");

  std::vector<std::pair<std::string, at::Tensor>> tensors;
  auto put = [&](const std::string& key, at::Tensor t) {
    for (auto& kv : tensors) {
      if (kv.first == key) {
        kv.second = std::move(t);
        return;
      }
    }
    tensors.emplace_back(key, std::move(t));
  };

  // solar._base_weight_at + the fingerprint check of solar._package_base_weight: (key, entry, bytes) of a
  // layer's base weight once its stored shape is checked and, with `check`, its fingerprint.
  auto checked = [&](const Layer& info, bool check, const std::string& what, std::string key, TensorEntry entry,
                     std::string bytes) {
    std::vector<int64_t> stored = info.shape;  // solar._base_weight
    if (info.fan_in_fan_out) std::reverse(stored.begin(), stored.end());
    if (entry.shape != stored) {
      const std::string m = info.shape.size() == 2 ? std::to_string(info.shape[0]) : "?";
      const std::string n = info.shape.size() == 2 ? std::to_string(info.shape[1]) : "?";
      fail(what + ": base weight " + key + " has shape " + shape_repr(entry.shape) + " but the update (" + m +
           " out x " + n + " in) needs " + shape_repr(stored) +
           (info.fan_in_fan_out ? " (stored in x out, as transformers' Conv1D)" : "") + ": wrong base model?");
    }
    if (check) {
      const std::string fp = fingerprint(*entry.dtype, entry.shape, bytes.data(), bytes.size());
      if (fp != info.fingerprint)
        fail(what + ": base weight " + key + " (" + std::string(entry.dtype->torch_name).substr(6) +  // "torch."
             ") differs from the one the package was made from (fingerprint " + fp + " != " + info.fingerprint +
             "): wrong base model, or the same one changed or saved in another dtype (the base must be exactly the "
             "sender's)");
    }
    return std::make_tuple(std::move(key), std::move(entry), std::move(bytes));
  };

  // solar._package_base_weight: (key, entry, bytes) of a layer's base weight, its shape checked and,
  // with `check`, its fingerprint against the package's.
  auto base_weight = [&](const Layer& info, bool check) {
    const std::string what = layer_name(info);
    if (info.expert >= 0) {  // a MoE expert's slice: of the recorded key, or its parts' rows concatenated
      auto [entry, bytes] = bw.get_expert(info.base_key, info.base_parts, info.expert, info.experts, what);
      return checked(info, check, what, info.base_key, std::move(entry), std::move(bytes));
    }
    std::string key;
    try {
      key = bw.key_for_module(info.module);
    } catch (const Failure& e) {
      // An output embedding tied to the input one (a LLaMA's lm_head): the encoder found the stored
      // key from the model's config (io.BaseWeights.key_for_module) and recorded it; the fingerprint
      // check shows it to be the same weight. From a folder only where its config.json may tie
      // embeddings; a bare .safetensors file has no config to ask, so there the recorded key is taken
      // (solar._package_base_weight). So is a module the encoder found by the name transformers gives the
      // stored weight as it loads the model (`renamed`: ViT's q_proj for ...attention.query), which this
      // decoder cannot work out.
      if (!(bw.may_tie_embeddings() || bw.is_file() || info.renamed) || !bw.has(info.base_key))
        fail(what + ": " + e.what());
      key = info.base_key;
    }
    auto [entry, bytes] = bw.get(key);
    return checked(info, check, what, std::move(key), std::move(entry), std::move(bytes));
  };
  // Every layer's base weight is checked before any layer is decoded, as solar.decompress does: a
  // wrong base fails in seconds, and both decoders name the same layer.
  for (const Layer& info : pkg.layers) base_weight(info, true);

  // A layer's factors into the adapter; a MoE expert's are stacked into its module's LoRA once all its
  // experts are decoded (solar.decompress, io.stack_experts: column k * E + e of lora_B is expert e's k-th).
  std::map<std::string, std::map<int64_t, std::pair<at::Tensor, at::Tensor>>> experts;
  auto put_layer = [&](const Layer& info, const std::string& prefix, at::Tensor B, at::Tensor A) {
    if (info.expert >= 0) {
      auto& pairs = experts[prefix];
      pairs[info.expert] = {B.to(dtype), A.to(dtype)};
      if (static_cast<int64_t>(pairs.size()) < info.experts) return;
      std::vector<at::Tensor> Bs, As;
      for (const auto& [e, pair] : pairs) {
        Bs.push_back(pair.first);
        As.push_back(pair.second);
      }
      B = at::stack(Bs, 2).reshape({info.shape[0], -1});
      A = at::cat(As, 0);
      experts.erase(prefix);
    }
    put(prefix + ".lora_A.weight", A.to(dtype));
    put(prefix + ".lora_B.weight", B.to(dtype));
  };

  for (size_t i = 0; i < pkg.layers.size(); ++i) {
    const Layer& info = pkg.layers[i];
    const std::string what = layer_name(info);
    const std::string prefix = "base_model.model." + info.module;
    if (info.lowrank) {  // solar._pad_factors: the factors themselves, zero pairs after t; no basis
      const at::Tensor& Bs = pkg.lora_B[i];
      const at::Tensor& As = pkg.lora_A[i];
      at::Tensor B = at::zeros({info.shape[0], info.rank}, at::kFloat);
      at::Tensor A = at::zeros({info.rank, info.shape[1]}, at::kFloat);
      B.narrow(1, 0, Bs.size(1)).copy_(Bs);
      A.narrow(0, 0, As.size(0)).copy_(As);
      put_layer(info, prefix, B, A);
      continue;
    }
    const auto [key, entry, bytes] = base_weight(info, false);  // (a low-rank layer's is not read again)
    const at::Tensor stored_W0 = to_tensor(entry, bytes);
    const at::Tensor W0 = info.fan_in_fan_out ? stored_W0.t() : stored_W0;  // io.as_update_layout
    try {
      at::Tensor B, A, ck;
      if (pkg.indices[i].numel() == 0 && pkg.values[i].numel() == 0) {
        // nothing kept: zero factors and a zero checksum whatever the bases, which are not built
        // (solar._decode_solar)
        B = at::zeros({info.shape[0], info.rank}, at::kDouble);
        A = at::zeros({info.rank, info.shape[1]}, at::kDouble);
        ck = at::zeros({2}, at::kDouble);
      } else {
        auto [U, V] = solar_basis.call(W0, pkg.seed, info.stream, pkg.eps);
        std::tie(B, A, ck) = solar_decode.call(U, V, pkg.values[i], pkg.indices[i], info.rank, info.scaling,
                                               pkg.seed, info.stream);
      }
      const at::Tensor ckd = ck.to(at::kDouble).contiguous();
      std::vector<double> got(static_cast<size_t>(ckd.numel()));
      for (size_t k = 0; k < got.size(); ++k) got[k] = ckd.data_ptr<double>()[k];
      const double tol = kChecksumTol * std::max(1.0, std::sqrt(info.nnz));
      const size_t n = std::min(got.size(), info.checksum.size());  // zip()
      for (size_t k = 0; k < n; ++k) {
        if (std::abs(got[k] - info.checksum[k]) > tol)
          fail(what + ": the regenerated basis does not match the sender's (checksum " + python_float_list(got) +
               " != " + python_float_list(info.checksum) + "): " +
               (pkg.basis == "1"  // solar._mismatch_cause
                    ? "the package predates basis rule 2 (made by an older build): if singular values of " + key +
                          " are (nearly) tied (a rank-deficient, pruned or orthogonal weight), its basis depended on "
                          "the sender's LAPACK, so compress the adapter again with this build; otherwise the seed or "
                          "eps was edited"
                    : "the seed, eps or the layer's stream differs from the sender's (an edited package), or "
                      "this machine's LAPACK resolves " + key + "'s singular vectors differently from the sender's (a "
                      "singular-value gap at the tie tolerance, 1e-8 of the largest, or a sign-symmetric weight "
                      "packed by a build before the sign rule's ties): compress the adapter again on a machine like "
                      "this one"));
      }
      put_layer(info, prefix, B, A);
    } catch (const c10::Error& e) {
      std::string msg = e.what_without_backtrace();
      fail(what + ": " + msg);
    }
  }
  for (const auto& [name, t] : pkg.extra) put(name, t);

  Json config = pkg.peft_config;
  const Json* peft_type = config.find("peft_type");
  if (peft_type && peft_type->type == Json::Type::String) {
    std::string upper = peft_type->text;
    std::transform(upper.begin(), upper.end(), upper.begin(),
                   [](unsigned char c) { return static_cast<char>(std::toupper(c)); });
    if (upper == "ADALORA") config = adalora_as_lora(config, pkg.layers);
  }

  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec || !fs::is_directory(out_dir)) fail(out_dir + ": cannot create the output folder" + (ec ? " (" + ec.message() + ")" : ""));
  std::string text;
  python_json_dump(config, text, 0);
  const std::string config_path = (fs::path(out_dir) / "adapter_config.json").string();
  {
    std::ofstream f(config_path, std::ios::binary | std::ios::trunc);
    if (!f) fail(config_path + ": cannot write");
    f << text;
    f.close();
    if (!f) fail(config_path + ": write error");
  }
  write_safetensors((fs::path(out_dir) / "adapter_model.safetensors").string(), tensors, {{"format", "pt"}});
}

// One line: newlines in library messages become "; ".
std::string one_line(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  std::string out;
  for (const char c : s) {
    if (c == '\n') out += "; ";
    else out += c;
  }
  return out;
}

constexpr const char* kUsage =
    "usage: solar_decode PACKAGE.safetensors BASE OUT_DIR\n"
    "  Decode a SOLAR package against its base model (BASE: a .safetensors file or a folder of them)\n"
    "  into a peft LoRA adapter folder OUT_DIR (adapter_config.json + adapter_model.safetensors).\n";

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && (std::strcmp(argv[1], "-h") == 0 || std::strcmp(argv[1], "--help") == 0)) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  if (argc != 4) {
    std::fputs(kUsage, stderr);
    return 2;
  }
  try {
    decode(argv[1], argv[2], argv[3]);
  } catch (const Failure& e) {
    std::fprintf(stderr, "solar_decode: error: %s\n", one_line(e.what()).c_str());
    return 1;
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "solar_decode: error: %s\n", one_line(e.what_without_backtrace()).c_str());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "solar_decode: error: %s\n", one_line(e.what()).c_str());
    return 1;
  }
  return 0;
}
