// gguf.cpp - (being written)
#include "gguf.h"
