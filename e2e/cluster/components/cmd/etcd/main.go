// Command etcd is etcd's own server entry point, built from the etcd module that Kubernetes
// pins, so the test bed needs no downloaded binary.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
