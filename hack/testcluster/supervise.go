package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

// supervisor starts components as child processes, each logging to DIR/NAME.log, in their own
// process group and with SIGTERM from the kernel should the supervisor die (childSysProcAttr).
type supervisor struct {
	dir      string
	children []*child
	exited   chan *child // each child, once, when it exits
	logf     func(format string, a ...any)
}

func newSupervisor(dir string, logf func(format string, a ...any)) *supervisor {
	return &supervisor{dir: dir, exited: make(chan *child, 16), logf: logf}
}

// start runs program with argv0 and args; env is added to this process's environment.
func (s *supervisor) start(name, program, argv0 string, args []string, env ...string) (*child, error) {
	logPath := filepath.Join(s.dir, name+".log")
	f, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer f.Close() // the child keeps its own descriptor
	cmd := exec.Command(program, args...)
	cmd.Args[0] = argv0
	cmd.Stdin = nil
	cmd.Stdout = f
	cmd.Stderr = f
	cmd.Dir = s.dir
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = childSysProcAttr()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	c := &child{name: name, log: logPath, cmd: cmd, done: make(chan struct{})}
	go func() {
		c.err = cmd.Wait()
		close(c.done)
		s.exited <- c
	}()
	s.children = append(s.children, c)
	s.logf("started %s (pid %d), log %s", name, cmd.Process.Pid, logPath)
	return c, nil
}

// startSelf re-executes this binary as one of its commands (a component's upstream main).
func (s *supervisor) startSelf(self, name string, args ...string) (*child, error) {
	return s.start(name, self, "testcluster", append([]string{name}, args...),
		fmt.Sprintf("%s=%d", parentPIDEnv, os.Getpid()))
}

// forget drops an exited child, so that byName finds the one started in its place.
func (s *supervisor) forget(gone *child) {
	kept := s.children[:0]
	for _, c := range s.children {
		if c != gone {
			kept = append(kept, c)
		}
	}
	s.children = kept
}

func (s *supervisor) byName(name string) *child {
	for _, c := range s.children {
		if c.name == name {
			return c
		}
	}
	return nil
}
