// A minimal test harness shared by the C++ tests: counts passed and failed
// checks, prints the first failures in full and a closing summary line, and
// turns the count into the process exit status that ctest reads.
#pragma once

#include <cmath>
#include <cstdio>
#include <sstream>
#include <string>

namespace fastopt::test {

struct Counters {
  long passed = 0;
  long failed = 0;
};

inline Counters& counters() {
  static Counters c;
  return c;
}

// Printing every failure of a broken formula would flood the log with
// thousands of lines that say the same thing; the first ones locate it.
constexpr long kMaxPrintedFailures = 30;

inline void record(bool ok, const std::string& what) {
  if (ok) {
    ++counters().passed;
    return;
  }
  if (++counters().failed <= kMaxPrintedFailures) std::fprintf(stderr, "FAIL: %s\n", what.c_str());
}

template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream out;
  out.precision(17);
  (out << ... << args);
  return out.str();
}

// Prints "N passed, M failed" and returns the exit status.
inline int summary(const char* test_name) {
  const Counters& c = counters();
  std::printf("%s: %ld passed, %ld failed\n", test_name, c.passed, c.failed);
  return c.failed == 0 && c.passed > 0 ? 0 : 1;
}

}  // namespace fastopt::test

// FASTOPT_CHECK(condition, context...): records one check; the context (at
// least one argument, "" for none) is printed with the condition on failure.
#define FASTOPT_CHECK(cond, ...)                                                                \
  ::fastopt::test::record(static_cast<bool>(cond),                                               \
                          ::fastopt::test::concat(__FILE__, ":", __LINE__, ": ", #cond, " -- ", \
                                                  __VA_ARGS__))
