// model.cpp - (being written)
#include "model.h"
