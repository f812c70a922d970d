//go:build !linux

package main

import "fmt"

// The node tier runs on Linux only (containerd, runc, iptables, a bridge).
func runNode([]string) int {
	fmt.Println("testcluster node: the node tier needs Linux")
	return 3
}

func runNodeClean([]string) int { return runNode(nil) }
