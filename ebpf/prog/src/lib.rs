// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Exists so the agent can list this crate as a build-dependency (rebuild on change);
//! the program itself is the `marklb-ebpf` binary.
#![no_std]
