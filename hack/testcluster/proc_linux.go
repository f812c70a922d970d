//go:build linux

package main

import "syscall"

// childSysProcAttr puts a child in its own process group (so a terminal's
// Ctrl-C reaches only "up", which then stops the children in order) and asks
// the kernel to send it SIGTERM when "up" dies, even by SIGKILL.
func childSysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
}
