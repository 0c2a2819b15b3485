// Command etcd is a tiny wrapper around go.etcd.io/etcd/server/v3/etcdmain.
//
// etcd's own main module (go.etcd.io/etcd/v3) uses relative replace
// directives, so it cannot be built with `go install ...@version`; the
// server module's etcdmain package is the whole program, this just calls it.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
