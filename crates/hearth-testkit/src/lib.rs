//! Test harness: starts real services (Garage) and finds real peers (Litestream) for hearth's tests.
