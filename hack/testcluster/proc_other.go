//go:build !linux

package main

import "syscall"

// childSysProcAttr: without Pdeathsig, children rely on the parent watchdog
// (see startParentWatchdog) to exit when "up" dies.
func childSysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true}
}
