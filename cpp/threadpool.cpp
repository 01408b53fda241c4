// threadpool.cpp - (being written)
#include "threadpool.h"
