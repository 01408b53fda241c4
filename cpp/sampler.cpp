// sampler.cpp - (being written)
#include "sampler.h"
