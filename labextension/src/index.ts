import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { LabIcon } from '@jupyterlab/ui-components';

import iconSvg from '../style/icons/fineinfer.svg';
import { FineInferModel } from './model';
import { FineInferPanel } from './view';

export const fineinferIcon = new LabIcon({ name: 'fineinfer-jupyter:icon', svgstr: iconSvg });

/** The FineInfer dashboard in the left sidebar. */
const sidebar: JupyterFrontEndPlugin<void> = {
  id: 'fineinfer-jupyter:sidebar',
  description: 'Engine state, live charts, training jobs and adapters of the FineInfer server.',
  autoStart: true,
  optional: [ILayoutRestorer],
  activate: (app: JupyterFrontEnd, restorer: ILayoutRestorer | null) => {
    const model = new FineInferModel(app.serviceManager.serverSettings);
    const panel = new FineInferPanel(model);
    panel.id = 'fineinfer-sidebar';
    panel.title.icon = fineinferIcon;
    panel.title.caption = 'FineInfer';
    panel.disposed.connect(() => model.dispose());
    app.shell.add(panel, 'left', { rank: 900 });
    restorer?.add(panel, panel.id);
  }
};

export default [sidebar];
