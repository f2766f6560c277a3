// The small harness of the C++ tests (csrc/tests/test_*.cpp): failure and check
// counters, FAIL lines, expecting a c10::Error, and the summary + exit status.
#pragma once

#include <c10/util/Exception.h>

#include <cstdio>
#include <string>

namespace slime_rl_test {

inline int g_failures = 0;
inline int g_checks = 0;

inline void fail(const std::string& what, const std::string& why) {
  std::printf("FAIL %s: %s\n", what.c_str(), why.c_str());
  ++g_failures;
}

// `call` must throw a c10::Error whose message contains `needle` (any message when empty).
template <typename F>
void expect_error(const std::string& what, const std::string& needle, F&& call) {
  ++g_checks;
  try {
    call();
    fail(what, "did not raise");
  } catch (const c10::Error& e) {
    if (!needle.empty() && std::string(e.what()).find(needle) == std::string::npos) {
      fail(what, "message lacks '" + needle + "': " + e.what());
    }
  }
}

// The last line of main: prints the summary and returns the exit status.
inline int finish(const char* test) {
  std::printf("%s %s: %d checks, %d failures\n", g_failures ? "FAILED" : "OK", test, g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}

}  // namespace slime_rl_test
