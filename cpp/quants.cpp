// quants.cpp - (being written)
#include "quants.h"
