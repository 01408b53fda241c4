// matmul.cpp - (being written)
#include "matmul.h"
