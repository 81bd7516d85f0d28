//! Several hosts on one machine for tests: network namespaces joined by veth pairs (root only).
