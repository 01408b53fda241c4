// cpu_engine.cpp - (being written)
#include "engine.h"
