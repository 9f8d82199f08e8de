// apiextensions-apiserver for marklb's tests: k8s.io/apiextensions-apiserver (current CRD
// semantics: structural schemas, CEL x-kubernetes-validations with cost limits, server-side
// apply, status, watch) as a standalone server, without a kube-apiserver behind it.
//
// Unlike the stock binary it delegates nothing: no delegated authentication, authorization or
// admission (every request is an administrator, every request is allowed: bind it to loopback
// only), no core API client. Discovery is on: /apis lists apiextensions.k8s.io and every group
// of an established CRD (kept in sync by an informer; the aggregated form is kept by the
// library's own discovery controller), /api is an empty APIVersions. OpenAPI v2 and v3 are served.
//
// Flags are the stock ones (--etcd-servers, --bind-address, --secure-port, --cert-dir, ...).
// Built by scripts/k8s/build-apiext.sh; the version comes from -ldflags -X.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"sort"
	"sync"

	"github.com/spf13/cobra"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1beta1"
	"k8s.io/apiextensions-apiserver/pkg/apiserver"
	"k8s.io/apiextensions-apiserver/pkg/cmd/server/options"
	generatedopenapi "k8s.io/apiextensions-apiserver/pkg/generated/openapi"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	utilversion "k8s.io/apimachinery/pkg/version"
	"k8s.io/apiserver/pkg/admission"
	"k8s.io/apiserver/pkg/authentication/authenticator"
	"k8s.io/apiserver/pkg/authentication/user"
	"k8s.io/apiserver/pkg/authorization/authorizerfactory"
	"k8s.io/apiserver/pkg/endpoints/discovery"
	openapinamer "k8s.io/apiserver/pkg/endpoints/openapi"
	genericapiserver "k8s.io/apiserver/pkg/server"
	"k8s.io/apiserver/pkg/util/openapi"
	"k8s.io/apiserver/pkg/util/webhook"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/cache"
	"k8s.io/component-base/cli"
	netutils "k8s.io/utils/net"

	noopoteltrace "go.opentelemetry.io/otel/trace/noop"
)

func main() {
	ctx := genericapiserver.SetupSignalContext()
	o := options.NewCustomResourceDefinitionsServerOptions(os.Stdout, os.Stderr)
	// Nothing to delegate to: no kube-apiserver exists behind this server.
	o.RecommendedOptions.Authentication = nil
	o.RecommendedOptions.Authorization = nil
	o.RecommendedOptions.CoreAPI = nil
	o.RecommendedOptions.Admission = nil
	o.RecommendedOptions.Features.EnablePriorityAndFairness = false
	o.RecommendedOptions.SecureServing.BindAddress = netutils.ParseIPSloppy("127.0.0.1")
	o.ServerRunOptions.AdvertiseAddress = netutils.ParseIPSloppy("127.0.0.1")

	cmd := &cobra.Command{
		Use:   "apiextensions-apiserver",
		Short: "Standalone apiextensions-apiserver for tests (no authn/authz: loopback only)",
		PersistentPreRunE: func(*cobra.Command, []string) error {
			return o.ServerRunOptions.ComponentGlobalsRegistry.Set()
		},
		RunE: func(c *cobra.Command, _ []string) error {
			if err := o.Complete(); err != nil {
				return err
			}
			if err := o.Validate(); err != nil {
				return err
			}
			return run(c.Context(), o)
		},
	}
	cmd.SetContext(ctx)
	o.AddFlags(cmd.Flags())
	os.Exit(cli.Run(cmd))
}

// adminAuthenticator makes every request an administrator (system:masters).
var adminAuthenticator = authenticator.RequestFunc(func(*http.Request) (*authenticator.Response, bool, error) {
	return &authenticator.Response{User: &user.DefaultInfo{
		Name:   "admin",
		Groups: []string{user.SystemPrivilegedGroup, user.AllAuthenticated},
	}}, true, nil
})

// noServices resolves no service: there is no core API (conversion webhooks cannot be used).
type noServices struct{}

func (noServices) ResolveEndpoint(namespace, name string, port int32) (*url.URL, error) {
	return nil, fmt.Errorf("service %s/%s:%d: this test server has no core API", namespace, name, port)
}

func config(o *options.CustomResourceDefinitionsServerOptions) (*apiserver.Config, error) {
	if err := o.RecommendedOptions.SecureServing.MaybeDefaultWithSelfSignedCerts("localhost", nil,
		[]net.IP{netutils.ParseIPSloppy("127.0.0.1")}); err != nil {
		return nil, fmt.Errorf("error creating self-signed certificates: %v", err)
	}
	serverConfig := genericapiserver.NewRecommendedConfig(apiserver.Codecs)
	if err := o.ServerRunOptions.ApplyTo(&serverConfig.Config); err != nil {
		return nil, err
	}
	if err := o.RecommendedOptions.ApplyTo(serverConfig); err != nil {
		return nil, err
	}
	if err := o.APIEnablement.ApplyTo(&serverConfig.Config, apiserver.DefaultAPIResourceConfigSource(), apiserver.Scheme); err != nil {
		return nil, err
	}
	serverConfig.Authentication.Authenticator = adminAuthenticator
	serverConfig.Authorization.Authorizer = authorizerfactory.NewAlwaysAllowAuthorizer()
	serverConfig.AdmissionControl = admission.NewChainHandler()

	defs := openapi.GetOpenAPIDefinitionsWithoutDisabledFeatures(generatedopenapi.GetOpenAPIDefinitions)
	serverConfig.OpenAPIConfig = genericapiserver.DefaultOpenAPIConfig(defs, openapinamer.NewDefinitionNamer(apiserver.Scheme, scheme.Scheme))
	serverConfig.OpenAPIV3Config = genericapiserver.DefaultOpenAPIV3Config(defs, openapinamer.NewDefinitionNamer(apiserver.Scheme, scheme.Scheme))

	return &apiserver.Config{
		GenericConfig: serverConfig,
		ExtraConfig: apiserver.ExtraConfig{
			CRDRESTOptionsGetter: options.NewCRDRESTOptionsGetter(*o.RecommendedOptions.Etcd,
				serverConfig.ResourceTransformers, serverConfig.StorageObjectCountTracker),
			ServiceResolver: noServices{},
			AuthResolverWrapper: webhook.NewDefaultAuthenticationInfoResolverWrapper(nil, nil,
				serverConfig.LoopbackClientConfig, noopoteltrace.NewTracerProvider()),
		},
	}, nil
}

func run(ctx context.Context, o *options.CustomResourceDefinitionsServerOptions) error {
	cfg, err := config(o)
	if err != nil {
		return err
	}
	completed := cfg.Complete()
	// Complete() turns discovery off (kube-apiserver's aggregator serves it); we serve it.
	completed.GenericConfig.EnableDiscovery = true
	server, err := completed.New(genericapiserver.NewEmptyDelegate())
	if err != nil {
		return err
	}
	gs := server.GenericAPIServer

	// An empty legacy API: no core group here.
	gs.Handler.NonGoRestfulMux.Handle("/api", http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(metav1.APIVersions{
			TypeMeta:                   metav1.TypeMeta{Kind: "APIVersions"},
			Versions:                   []string{},
			ServerAddressByClientCIDRs: []metav1.ServerAddressByClientCIDR{},
		})
	}))

	// Legacy /apis: add the groups of established CRDs as they come and go.
	crdInformer := server.Informers.Apiextensions().V1().CustomResourceDefinitions()
	sync := &groupSync{manager: gs.DiscoveryGroupManager, lister: crdInformer.Lister().List, added: map[string]bool{}}
	if _, err := crdInformer.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { sync.resync() },
		UpdateFunc: func(any, any) { sync.resync() },
		DeleteFunc: func(any) { sync.resync() },
	}); err != nil {
		return err
	}

	err = gs.PrepareRun().RunWithContext(ctx)
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

type groupSync struct {
	mu      sync.Mutex
	manager discovery.GroupManager
	lister  func(labels.Selector) ([]*apiextensionsv1.CustomResourceDefinition, error)
	added   map[string]bool
}

func (s *groupSync) resync() {
	s.mu.Lock()
	defer s.mu.Unlock()
	crds, err := s.lister(labels.Everything())
	if err != nil {
		return
	}
	versions := map[string]map[string]bool{}
	for _, crd := range crds {
		established := false
		for _, c := range crd.Status.Conditions {
			if c.Type == apiextensionsv1.Established && c.Status == apiextensionsv1.ConditionTrue {
				established = true
			}
		}
		if !established || crd.Spec.Group == v1beta1.GroupName {
			continue
		}
		for _, v := range crd.Spec.Versions {
			if v.Served {
				if versions[crd.Spec.Group] == nil {
					versions[crd.Spec.Group] = map[string]bool{}
				}
				versions[crd.Spec.Group][v.Name] = true
			}
		}
	}
	for group := range s.added {
		if versions[group] == nil {
			s.manager.RemoveGroup(group)
			delete(s.added, group)
		}
	}
	for group, set := range versions {
		names := make([]string, 0, len(set))
		for v := range set {
			names = append(names, v)
		}
		sort.Slice(names, func(i, j int) bool {
			return utilversion.CompareKubeAwareVersionStrings(names[i], names[j]) > 0
		})
		g := metav1.APIGroup{Name: group}
		for _, v := range names {
			g.Versions = append(g.Versions, metav1.GroupVersionForDiscovery{GroupVersion: group + "/" + v, Version: v})
		}
		g.PreferredVersion = g.Versions[0]
		s.manager.AddGroup(g)
		s.added[group] = true
	}
}
