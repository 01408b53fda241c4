// main.cpp - doctest's runner for the orcd C++ test suite (tests/cpp/test_*.cpp).
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
